"""TraDyCallback: re-samples TraDy's channels at every epoch boundary of a plain ``transformers.Trainer``."""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .model import find_trady_model

logger = logging.getLogger(__name__)

__all__ = ["TraDyCallback"]


class TraDyCallback(TrainerCallback):
    """Re-sample TraDy's channels at every epoch start, under one process or DDP (``torchrun``).

    At each epoch start the current update is merged into the base weights, the channels of epoch ``e`` are drawn
    with the seed ``(config.seed, e)`` (the same on every rank) and the optimizer state of the flat parameter is
    reset. With ``resample_every_steps`` in the config, the model re-samples itself from an optimizer hook and the
    callback only checks that the model is calibrated.

    For ``selection="det_rgn"`` the channel RGN is recomputed at every epoch on the first
    ``config.calibration_batches`` batches of the train dataloader (or on ``rgn_batches``), with full weight
    gradients: a baseline outside the budget.

    Args:
        rgn_batches: batches for the ``det_rgn`` refresh instead of the train dataloader's.

    Example::

        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=train, callbacks=[TraDyCallback()])
        >>> trainer.add_callback(TraDyCallback())  # or, on an existing Trainer    # doctest: +SKIP
    """

    def __init__(self, rgn_batches: Optional[Iterable[Any]] = None) -> None:
        self.rgn_batches = rgn_batches

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        tuner = find_trady_model(model)
        if not tuner.is_calibrated():
            raise RuntimeError("TraDy is not calibrated: call hf_collapse.trady.calibrate(model, batches) before "
                               "trainer.train() (it measures the cost model, ranks the layers and allocates the "
                               "trainable slices the optimizer must see)")
        tuner.__dict__["_callback_attached"] = True

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        tuner = find_trady_model(model)
        config = tuner.peft_config[tuner._adapter()]
        if config.resample_every_steps:
            return
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        if config.selection == "det_rgn" and epoch > 0:
            batches = self.rgn_batches if self.rgn_batches is not None else train_dataloader
            if batches is not None:
                tuner.refresh_rgn(batches)
        changed = tuner.resample(epoch, optimizer)
        if changed:
            summary = tuner.budget_summary()
            logger.info("TraDy epoch %d: %d channels in %d layers (%.0f of %.0f budget elements)", epoch,
                        summary["channels"], summary["layers_with_channels"], summary["used_elements"],
                        summary["budget_elements"])

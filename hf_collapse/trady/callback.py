"""TraDyCallback: how a ``transformers.Trainer`` drives a TraDy adapter. It calibrates the adapter when training
begins (if needed), re-samples its channels at every epoch boundary, and checkpoints the run state a resume needs.

Pass it to the Trainer (``Trainer(..., callbacks=[TraDyCallback()])``): transformers' callbacks receive the model and
the optimizer, which is all TraDy needs. Without it, an adapter that :func:`~hf_collapse.trady.calibrate` did not
calibrate refuses to train, and a calibrated one trains its first draw until the end (with a warning).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .. import compat
from .model import TraDyModel, find_trady_model
from .sampling import optimizer_holds
from .sharding import check_not_sharded
from .strategies import SELECTIONS

logger = logging.getLogger(__name__)

__all__ = ["TraDyCallback"]

MULTI_PROCESS_MESSAGE = (
    "TraDy cannot calibrate itself under multi-process training ({world} processes): the Trainer has already built "
    "the optimizer and wrapped the model (DDP/FSDP registers every parameter with its size) before training begins, "
    "so the trainable channel slices must exist before that. Call hf_collapse.trady.calibrate(model, batches) on "
    "every rank before building the Trainer."
)


class TraDyCallback(TrainerCallback, ExportableState):
    """Drives a TraDy adapter under a ``transformers.Trainer``, one process or DDP (``torchrun``): pass it in
    ``callbacks``.

    * **Training begins**: under FSDP or DeepSpeed (the accelerator's mode, FSDP-wrapped modules, DTensor or ZeRO-3
      parameters) training is refused (:mod:`~hf_collapse.trady.sharding`); an adapter that is not calibrated yet
      is calibrated on the first
      ``config.calibration_batches`` batches of the training data, in order (one process only: under DDP call
      :func:`~hf_collapse.trady.calibrate` before building the Trainer). Its trainable parameter was created empty
      at ``get_peft_model`` and the Trainer's optimizer already holds it: calibration gives it its size in place,
      before the first optimizer step.
    * **Every epoch start**: the current update is merged into the base weights, the channels of epoch ``e`` are
      drawn with the seed ``(config.seed, e)`` (the same on every rank) and the optimizer state of the flat
      parameter is reset. With ``resample_every_steps`` in the config, the model re-samples itself from an optimizer
      hook instead.
    * **Checkpoints**: the run state that is not in the adapter checkpoint (the calibration, the draw index, the
      optimizer steps counted for ``resample_every_steps``) is saved with ``trainer_state.json`` (``ExportableState``)
      and restored when training resumes from that checkpoint, so that a resumed run ends where an uninterrupted
      one does. It is restored whatever ``restore_callback_states_from_checkpoint`` says: it is the model's state.

    For ``selection="det_rgn"`` the channel RGN is recomputed at every epoch on the first
    ``config.calibration_batches`` batches of the training data, in order (or on ``rgn_batches``), with full weight
    gradients: a baseline outside the budget.

    Args:
        rgn_batches: batches for the ``det_rgn`` refresh instead of the train dataloader's.

    Example (not run by doctest: it needs a TraDy peft model and training data, as in the README's TraDy section)::

        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=train,
        ...                   callbacks=[TraDyCallback()])   # doctest: +SKIP
        >>> trainer.train()                                  # calibrates, re-samples every epoch   # doctest: +SKIP
    """

    def __init__(self, rgn_batches: Iterable[Any] | None = None) -> None:
        self.rgn_batches = rgn_batches
        self.run_state: dict | None = None
        self._tuner: TraDyModel | None = None

    # -- ExportableState
    def state(self) -> dict:
        """The run state to checkpoint (see the class docstring)."""
        if self._tuner is not None:
            self.run_state = self._tuner.export_run_state()
        return {"args": {}, "attributes": {"run_state": self.run_state}}

    # -- events
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        tuner = find_trady_model(model)
        check_not_sharded(tuner.model, trainer=kwargs.get("trainer"), action="train")
        self._tuner = tuner
        tuner.trady_state.driven = True
        saved = compat.saved_callback_state(state, type(self).__name__) if state.global_step > 0 else None
        run_state = (saved or {}).get("run_state")
        if run_state:
            tuner.restore_run_state(run_state)
        elif not tuner.is_calibrated():
            self._calibrate(tuner, args, optimizer, train_dataloader)

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        tuner = find_trady_model(model)
        config = tuner.peft_config[tuner.active_adapter_name()]
        if config.resample_every_steps:
            return
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        if tuner.draw_index() == epoch:
            # This epoch's channels are drawn already: the calibration's draw at epoch 0, or a run resumed in the middle
            # of an epoch (its draw came back with the checkpoint; drawing again, det_rgn would rank channels by
            # gradients of partly trained weights, not those of the epoch's start as the uninterrupted run did).
            return
        if SELECTIONS.get(config.selection).refreshes_rgn and epoch > 0:
            batches = self.rgn_batches if self.rgn_batches is not None else _first_batches(args, train_dataloader)
            if batches is not None:
                with _outside_the_run(tuner):
                    tuner.refresh_rgn(batches)
        changed = tuner.resample(epoch, optimizer)
        if changed:
            summary = tuner.budget_summary()
            logger.info(
                "TraDy epoch %d: %d channels in %d layers (%.0f of %.0f budget elements)",
                epoch,
                summary["channels"],
                summary["layers_with_channels"],
                summary["used_elements"],
                summary["budget_elements"],
            )

    # -- calibration when training begins
    @staticmethod
    def _calibrate(tuner: TraDyModel, args: TrainingArguments, optimizer: Any, train_dataloader: Any) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            raise RuntimeError(MULTI_PROCESS_MESSAGE.format(world=world))
        adapter_name = tuner.active_adapter_name()
        flat = tuner.trady_flat[adapter_name]
        if optimizer is not None:
            optimizers = list(compat.unwrap_optimizer(optimizer))
            if not any(optimizer_holds(o, flat) for o in optimizers):
                raise RuntimeError(
                    "TraDy cannot calibrate itself: the optimizer does not hold its trainable parameter "
                    "(it was built from another model's parameters). Call "
                    "hf_collapse.trady.calibrate(model, batches) before building the optimizer."
                )
            if any(isinstance(getattr(o, "state", None), dict) and flat in o.state for o in optimizers):
                raise RuntimeError(
                    "TraDy cannot calibrate itself: the optimizer has already stepped its parameter. "
                    "Call hf_collapse.trady.calibrate(model, batches) before training."
                )
        loader = _first_batches(args, train_dataloader)
        if loader is None:
            raise RuntimeError(
                "TraDy cannot calibrate itself: the Trainer has no training dataloader. Call "
                "hf_collapse.trady.calibrate(model, batches) before training."
            )
        with _outside_the_run(tuner):
            summary = tuner.calibrate(loader)
        logger.info(
            "TraDy calibrated itself on %d training batches: %d layers kept, capacity %d elements",
            summary["batches"],
            len(summary["selected_layers"]),
            summary["capacity"],
        )


def _first_batches(args: TrainingArguments, train_dataloader: Any) -> DataLoader | None:
    """The training data in order (no shuffling) with the Trainer's own collator and batch size: what calibration and
    the ``det_rgn`` refresh measure, the same batches in an uninterrupted and in a resumed run (the Trainer's own
    dataloader shuffles by a state that a resumed run does not share). ``None`` without a training dataloader."""
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None:
        return None
    return DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        collate_fn=getattr(train_dataloader, "collate_fn", None),
        shuffle=False,
    )


@contextmanager
def _outside_the_run(tuner: TraDyModel) -> Iterator[None]:
    """Measure without touching the run: the global random generators (iterating a DataLoader draws from them, which
    would shift the Trainer's shuffling and dropout) are restored after, and autocast is off."""
    weight = next(iter(tuner.trady_layers().values())).get_base_layer().weight
    devices = [weight.device.index or 0] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.autocast(weight.device.type, enabled=False):
        yield

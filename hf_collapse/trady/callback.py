"""TraDyCallback: calibrates TraDy when training begins (if needed), re-samples its channels at every epoch boundary
of a plain ``transformers.Trainer``, and checkpoints the run state a resume needs.

The callback attaches itself: at the first training forward of a TraDy adapter under a Trainer without one, the
adapter adds a :class:`TraDyCallback` to that Trainer and runs its ``on_train_begin`` / ``on_epoch_begin``
(:func:`attach_to_trainer`). Passing ``callbacks=[TraDyCallback()]`` does the same one forward earlier.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .. import compat
from .model import TraDyModel, find_trady_model
from .sampling import _optimizer_holds
from .sharding import check_not_sharded

logger = logging.getLogger(__name__)

__all__ = ["TraDyCallback", "attach_to_trainer"]

MULTI_PROCESS_MESSAGE = (
    "TraDy cannot calibrate itself under multi-process training ({world} processes): the Trainer has already built "
    "the optimizer and wrapped the model (DDP/FSDP registers every parameter with its size) before training begins, "
    "so the trainable channel slices must exist before that. Call hf_collapse.trady.calibrate(model, batches) on "
    "every rank before building the Trainer.")


class TraDyCallback(TrainerCallback, ExportableState):
    """Drives a TraDy adapter under a plain ``transformers.Trainer``, one process or DDP (``torchrun``).

    * **Training begins**: under FSDP or DeepSpeed (the accelerator's mode, FSDP-wrapped modules, DTensor or ZeRO-3
      parameters) training is refused (:mod:`~hf_collapse.trady.sharding`); an adapter that is not calibrated yet is calibrated on the first
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
    ``config.calibration_batches`` batches of the train dataloader (or on ``rgn_batches``), with full weight
    gradients: a baseline outside the budget.

    Args:
        rgn_batches: batches for the ``det_rgn`` refresh instead of the train dataloader's.

    Example (not run by doctest: it needs a TraDy peft model and training data, as in the README's TraDy section)::

        >>> Trainer(model=peft_model, args=args, train_dataset=train).train()   # attaches itself   # doctest: +SKIP
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=train,
        ...                   callbacks=[TraDyCallback()])   # doctest: +SKIP
    """

    def __init__(self, rgn_batches: Optional[Iterable[Any]] = None) -> None:
        self.rgn_batches = rgn_batches
        self.run_state: Optional[dict] = None
        self._tuner: Optional[TraDyModel] = None

    # -- ExportableState
    def state(self) -> dict:
        """The run state to checkpoint (see the class docstring)."""
        if self._tuner is not None:
            self.run_state = self._tuner.export_run_state()
        return {"args": {}, "attributes": {"run_state": self.run_state}}

    # -- events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        tuner = find_trady_model(model)
        check_not_sharded(tuner.model, trainer=kwargs.get("trainer"), action="train")
        self._tuner = tuner
        tuner.__dict__["_callback_attached"] = True
        saved = compat.saved_callback_state(state, type(self).__name__) if state.global_step > 0 else None
        run_state = (saved or {}).get("run_state")
        if run_state:
            tuner.restore_run_state(run_state)
        elif not tuner.is_calibrated():
            self._calibrate(tuner, args, optimizer, train_dataloader)

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

    # -- calibration when training begins
    @staticmethod
    def _calibrate(tuner: TraDyModel, args: TrainingArguments, optimizer: Any, train_dataloader: Any) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            raise RuntimeError(MULTI_PROCESS_MESSAGE.format(world=world))
        adapter_name = tuner._adapter()
        flat = tuner.trady_flat[adapter_name]
        if optimizer is not None:
            optimizers = list(compat.unwrap_optimizer(optimizer))
            if not any(_optimizer_holds(o, flat) for o in optimizers):
                raise RuntimeError("TraDy cannot calibrate itself: the optimizer does not hold its trainable parameter "
                                   "(it was built from another model's parameters). Call "
                                   "hf_collapse.trady.calibrate(model, batches) before building the optimizer.")
            if any(isinstance(getattr(o, "state", None), dict) and flat in o.state for o in optimizers):
                raise RuntimeError("TraDy cannot calibrate itself: the optimizer has already stepped its parameter. "
                                   "Call hf_collapse.trady.calibrate(model, batches) before training.")
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None:
            raise RuntimeError("TraDy cannot calibrate itself: the Trainer has no training dataloader. Call "
                               "hf_collapse.trady.calibrate(model, batches) before training.")
        # The first batches in order (no shuffling), with the Trainer's own collator; outside the run's RNG streams
        # and autocast, so that the run is the one an explicit calibrate(model, same batches) would give.
        loader = DataLoader(dataset, batch_size=args.per_device_train_batch_size,
                            collate_fn=getattr(train_dataloader, "collate_fn", None), shuffle=False)
        weight = next(iter(tuner.trady_layers(adapter_name).values())).get_base_layer().weight
        devices = [weight.device.index or 0] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autocast(weight.device.type, enabled=False):
            summary = tuner.calibrate(loader)
        logger.info("TraDy calibrated itself on %d training batches: %d layers kept, capacity %d elements",
                    summary["batches"], len(summary["selected_layers"]), summary["capacity"])


def attach_to_trainer(trainer: Any) -> TraDyCallback:
    """Attach a :class:`TraDyCallback` to ``trainer`` (unless it has one) and run what it would have run so far in
    this training: ``on_train_begin`` (calibration or resume) and ``on_epoch_begin`` (the current epoch's draw).
    Called by the adapter at its first training forward under a Trainer; returns the callback."""
    callbacks = compat.trainer_callbacks(trainer)
    callback = next((c for c in callbacks if isinstance(c, TraDyCallback)), None)
    if callback is None:
        callback = TraDyCallback()
        trainer.add_callback(callback)
        logger.info("TraDy: attached a TraDyCallback to the Trainer (calibration, re-sampling, checkpointed state)")
    kwargs = compat.trainer_callback_kwargs(trainer)
    check_not_sharded(find_trady_model(trainer.model).model, trainer=trainer, action="train")
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, **kwargs)  # reads a resumed run's state
    compat.track_callback_state(trainer.state, callback)
    callback.on_epoch_begin(trainer.args, trainer.state, trainer.control, **kwargs)
    return callback

"""TraDyModel: the peft tuner of TraDy (``get_peft_model(model, TraDyConfig(...))``).

It wraps every target conv/linear in a :class:`~hf_collapse.trady.layer.TraDyLayer` and owns one flat trainable
parameter per adapter (``trady_flat``) whose slices are the deltas of the selected input channels. The flat
parameter keeps its size when channels are re-sampled, so the optimizer and DDP keep working; its size (the
*capacity*) is fixed by the budget at calibration.

Life cycle::

    model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))   # flat parameter: empty
    calibrate(model, batches)   # a priori: positions per layer (cost model), RGN ranking -> selected layers,
                                # flat parameter sized (in place), epoch-0 channels drawn. Optional on one process:
                                # under a Trainer the first training forward calibrates on the training data
    trainer = Trainer(model, args, ...)   # a TraDyCallback attaches itself: re-samples at every epoch,
    trainer.train()                       # checkpoints the run state a resume needs
    model.save_pretrained("adapter")   # merged slices + current delta + selection: reload is exact

The tuner is assembled from one module per concern: :mod:`~hf_collapse.trady.injection` (which layers are wrapped),
:mod:`~hf_collapse.trady.calibration` (the a priori measurements and ranking), :mod:`~hf_collapse.trady.sampling`
(budget, flat parameter, draws, re-sampling) and :mod:`~hf_collapse.trady.state_dict` (the adapter checkpoint).
"""

from __future__ import annotations

import logging
from typing import Any, Optional
import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .. import compat

from .calibration import NOT_CALIBRATED_MESSAGE, CalibrationMixin, calibrate
from .injection import InjectionMixin, default_target_modules
from .layer import TraDyLayer
from .sampling import SamplingMixin, reset_optimizer_state
from .sharding import check_not_sharded
from .state_dict import StateDictMixin

logger = logging.getLogger(__name__)

__all__ = ["TraDyModel", "calibrate", "default_target_modules", "find_trady_model", "reset_optimizer_state"]


class TraDyModel(InjectionMixin, CalibrationMixin, SamplingMixin, StateDictMixin, BaseTuner):
    """The TraDy tuner: created by ``peft.get_peft_model(model, TraDyConfig(...))``, not directly.

    Only one TraDy adapter per model is supported (the flat parameter, the merged base weights and the draws are
    per model).

    Example::

        >>> from peft import get_peft_model
        >>> from hf_collapse.trady import TraDyConfig, calibrate
        >>> peft_model = get_peft_model(model, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))  # doctest: +SKIP
        >>> calibrate(peft_model, batches)                                                          # doctest: +SKIP
        >>> peft_model.base_model.current_selection()                                               # doctest: +SKIP
        {'bert.encoder.layer.5.output.dense': [3, 17, ...], ...}
    """

    prefix: str = "trady_"
    tuner_layer_cls = TraDyLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    # ------------------------------------------------------------------------------------------- training forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward. The first training forward (train mode, gradients on) finds out who drives
        training: under a ``transformers.Trainer`` a :class:`~hf_collapse.trady.TraDyCallback` attaches itself (and
        calibrates the adapter on the training data if needed); elsewhere an uncalibrated adapter is refused."""
        if self.training and torch.is_grad_enabled() and not self._callback_attached:
            self._before_training_forward()
        return super().forward(*args, **kwargs)

    def _before_training_forward(self) -> None:
        adapter_name = self._adapter()
        if self.peft_config[adapter_name].inference_mode:
            return
        trainer = compat.running_trainer()
        if not self.__dict__.get("_sharding_checked"):
            check_not_sharded(self.model, trainer=trainer, action="train")
            self.__dict__["_sharding_checked"] = True
        if trainer is not None:
            from .callback import attach_to_trainer

            attach_to_trainer(trainer)
        elif not self.is_calibrated(adapter_name):
            raise RuntimeError(NOT_CALIBRATED_MESSAGE)

    # ------------------------------------------------------------------------------------------- giving the base back

    def merged_channel_count(self, adapter_name: Optional[str] = None) -> int:
        """How many input channels hold updates merged into the base weights by earlier re-samplings (or loaded
        from a checkpoint that had them): while it is not zero the original base model cannot be given back."""
        adapter_name = adapter_name or self._adapter()
        return sum(int(layer.trady_merged[adapter_name].sum()) for layer in self.trady_layers(adapter_name).values())

    def _refuse_if_base_changed(self, action: str) -> None:
        merged = self.merged_channel_count()
        if merged:
            layers = sum(1 for layer in self.trady_layers().values() if layer.trady_merged[self._adapter()].any())
            raise RuntimeError(
                f"TraDy cannot {action}: the updates of earlier re-samplings ({merged} input channels in {layers} "
                "layers) were merged into the base weights, so the original model no longer exists in this one. "
                "Use merge_and_unload() for the fine-tuned model, or load the base model again for the original.")

    def disable_adapter_layers(self) -> None:
        """Run the base model without the adapter (``with peft_model.disable_adapter():``).

        Raises:
            RuntimeError: when earlier re-samplings merged updates into the base weights: the original model
                cannot be given back exactly, so nothing is disabled.
        """
        self._refuse_if_base_changed("disable the adapter and give back the original model")
        super().disable_adapter_layers()

    def unload(self) -> nn.Module:
        """The base model without the TraDy layers, exactly as it was given to ``get_peft_model``.

        Raises:
            RuntimeError: when earlier re-samplings merged updates into the base weights (nothing is unloaded).
        """
        self._refuse_if_base_changed("unload and give back the original model")
        for layer in self.trady_layers().values():
            if layer.merged:
                layer.unmerge()  # exact: the merge kept the original slices
        return super().unload()

    # ------------------------------------------------------------------------------------------- peft plumbing

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, parameter in self.trady_flat.items():
            parameter.requires_grad_(name in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.trady_flat:
            del self.trady_flat[adapter_name]
        self._states.pop(adapter_name, None)
# ----------------------------------------------------------------------------------------------- helpers


def find_trady_model(model: nn.Module) -> TraDyModel:
    """The :class:`TraDyModel` inside ``model`` (a ``PeftModel``, a DDP/accelerate wrapper of one, or the tuner).

    Raises:
        ValueError: when ``model`` holds no TraDy adapter.

    Example::

        >>> tuner = find_trady_model(trainer.model_wrapped)        # doctest: +SKIP
        >>> tuner.current_selection()                              # doctest: +SKIP
    """
    seen = model
    while hasattr(seen, "module") and isinstance(seen.module, nn.Module) and not isinstance(seen, TraDyModel):
        seen = seen.module  # DDP and friends
    if isinstance(seen, TraDyModel):
        return seen
    base = getattr(seen, "base_model", None)
    if isinstance(base, TraDyModel):
        return base
    for module in seen.modules():
        if isinstance(module, TraDyModel):
            return module
    raise ValueError(f"{type(model).__name__} holds no TraDy adapter: create it with "
                     "peft.get_peft_model(model, hf_collapse.trady.TraDyConfig(...))")

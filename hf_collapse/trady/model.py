"""TraDyModel: the peft tuner of TraDy (``get_peft_model(model, TraDyConfig(...))``).

It wraps every target conv/linear in a :class:`~hf_collapse.trady.layer.TraDyLayer` and owns one flat trainable
parameter per adapter (``trady_flat``) whose slices are the deltas of the selected input channels. The flat
parameter keeps its size when channels are re-sampled, so the optimizer and DDP keep working; its size (the
*capacity*) is fixed by the budget at calibration.

Life cycle::

    model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    calibrate(model, batches)   # a priori: positions per layer (cost model), RGN ranking -> selected layers,
                                # flat parameter allocated, epoch-0 channels drawn
    trainer = Trainer(model, args, ..., callbacks=[TraDyCallback()])   # re-samples at every epoch
    trainer.train()
    model.save_pretrained("adapter")   # merged slices + current delta + selection: reload is exact

The tuner is assembled from one module per concern: :mod:`~hf_collapse.trady.injection` (which layers are wrapped),
:mod:`~hf_collapse.trady.calibration` (the a priori measurements and ranking), :mod:`~hf_collapse.trady.sampling`
(budget, flat parameter, draws, re-sampling) and :mod:`~hf_collapse.trady.state_dict` (the adapter checkpoint).
"""

from __future__ import annotations

import logging
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .calibration import CalibrationMixin, calibrate
from .injection import InjectionMixin, default_target_modules
from .layer import TraDyLayer
from .sampling import SamplingMixin, reset_optimizer_state
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

"""Injection: which modules TraDy wraps, and how ``get_peft_model`` wraps them (peft's tuner hooks).

Every target conv/linear is replaced by a :class:`~hf_collapse.trady.layer.TraDyLayer`; the tuner owns one flat
trainable parameter per adapter (``trady_flat``), created here so that an optimizer built before calibration (the
Trainer's) already holds it; calibration gives it its size.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from .. import compat
from .config import TraDyConfig
from .layer import TraDyLayer, _FlatStore, channel_ops_for, supported_module_types

__all__ = ["InjectionMixin", "default_target_modules"]


def default_target_modules(model: nn.Module, modules_to_save: Optional[Iterable[str]] = None) -> list[str]:
    """Every module TraDy can target (Linear, dense or depthwise Conv2d, GPT-2 Conv1D), except the output embeddings
    (often tied to the input embeddings) and the ``modules_to_save`` (the task head), by full name.

    Example:
        >>> names = default_target_modules(bert_for_sequence_classification, ["classifier"])  # doctest: +SKIP
        >>> names[:2]                                                                          # doctest: +SKIP
        ['bert.encoder.layer.0.attention.self.query', 'bert.encoder.layer.0.attention.self.key']
    """
    output_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_embeddings = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    skip = [m for m in (modules_to_save or [])]
    names = []
    for name, module in model.named_modules():
        if not name or module is output_embeddings:
            continue
        if any(f".{m}." in f".{name}." for m in skip):
            continue
        try:
            ops = channel_ops_for(module)
        except TypeError:
            continue  # a grouped conv TraDy cannot slice: not a default target
        if ops is not None:
            names.append(name)
    return names



class InjectionMixin:
    """The peft hooks :class:`~hf_collapse.trady.TraDyModel` implements to wrap the target layers."""

    def _pre_injection_hook(self, model: nn.Module, config: TraDyConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "TraDy supports a single adapter per model (its flat parameter and the merged base weights are "
                f"per model); it already has {sorted(n for n in self.peft_config if n != adapter_name)}"
            )
        if "trady_flat" not in self._modules:
            self.trady_flat = nn.ParameterDict()
            self.__dict__["_store"] = _FlatStore(self.trady_flat)
            self.__dict__["_states"] = {}
            self.__dict__["_callback_attached"] = False
        if config.target_modules is None:
            names = default_target_modules(model, config.modules_to_save)
            if not names:
                raise ValueError(f"TraDy found no module to target in {type(model).__name__}; supported: "
                                 f"{supported_module_types()}")
            config.target_modules = names
        self._check_targets(model, config)

    @staticmethod
    def _check_targets(model: nn.Module, config: TraDyConfig) -> None:
        matched, unsupported = [], []
        for name, module in model.named_modules():
            if not name:
                continue
            found = check_target_module_exists(config, name)
            if not found or compat.is_excluded_target(found):
                continue
            try:
                ops = channel_ops_for(module)
            except TypeError as error:
                unsupported.append(f"{name} ({error})")
                continue
            if ops is None:
                unsupported.append(f"{name} ({type(module).__name__})")
            else:
                matched.append(name)
        if unsupported:
            raise TypeError(f"TraDy cannot target {', '.join(unsupported[:5])}"
                            f"{' ...' if len(unsupported) > 5 else ''}; supported: {supported_module_types()}. "
                            "Narrow target_modules (names, suffixes or a regex) to those layers.")
        if not matched:
            examples = default_target_modules(model, config.modules_to_save)[:4]
            raise ValueError(f"TraDy: no module matches target_modules={config.target_modules!r} "
                             f"(exclude_modules={config.exclude_modules!r}). Give module names or suffixes of "
                             f"{supported_module_types()}, e.g. {examples}, or None for all of them.")

    def _prepare_adapter_config(self, peft_config: TraDyConfig, model_config: dict) -> TraDyConfig:
        return peft_config  # target_modules are resolved in _pre_injection_hook, from the model itself

    def _create_and_replace(self, peft_config: TraDyConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if isinstance(target, TraDyLayer):
            raise ValueError(f"{current_key} already carries a TraDy adapter: one TraDy adapter per model")
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key} already carries another peft adapter ({type(target).__name__}); "
                             "TraDy wraps plain layers only")
        new_module = TraDyLayer(target, adapter_name, self._store)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # As LoraModel does: BaseTuner's version copies `child.weight`, which a modules_to_save wrapper around a
        # head without a weight (RoBERTa's classification head, ResNet's Sequential) does not have at unload time.
        # A TraDy layer holds no tensor of its own, so there is nothing to move to the base layer's device.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: TraDyConfig, adapter_name: str) -> None:
        if adapter_name not in self.trady_flat:
            # An empty placeholder: an optimizer built before calibration (the Trainer builds it before
            # on_train_begin) holds this very Parameter, which calibration resizes in place.
            first = next(iter(self.trady_layers(adapter_name).values())).get_base_layer().weight
            self.trady_flat[adapter_name] = nn.Parameter(torch.zeros(0, dtype=first.dtype, device=first.device),
                                                         requires_grad=not config.inference_mode)
        if config.is_calibrated:
            self._setup(adapter_name)
        self._register_step_hook()

    # ------------------------------------------------------------------------------------------- layers

    def trady_layers(self, adapter_name: Optional[str] = None) -> dict[str, TraDyLayer]:
        """The TraDy layers by name relative to the base model, in forward order once calibrated."""
        adapter_name = adapter_name or self._adapter()
        layers = {name: module for name, module in self.model.named_modules() if isinstance(module, TraDyLayer)
                  and adapter_name in module.trady_selected}
        positions = self.peft_config[adapter_name].layer_positions or {}
        ordered = {name: layers[name] for name in positions if name in layers}
        ordered.update({name: layer for name, layer in layers.items() if name not in ordered})
        return ordered

    def _adapter(self) -> str:
        active = self.active_adapter
        return active if isinstance(active, str) else active[0]

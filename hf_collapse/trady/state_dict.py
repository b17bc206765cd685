"""State dict: what a TraDy adapter checkpoint holds beyond the flat parameter, and how it is loaded back.

For every layer: the channels already merged into its base weight and their values (``trady_merged_index`` /
``trady_merged_weight``), the current selection and its offset in the flat parameter (``trady_selected`` /
``trady_offset``). With the flat parameter (``trady_flat``) and the config, reload is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from .config import TraDyConfig
from .layer import TraDyLayer

__all__ = ["StateDictMixin"]

_LAYER_ENTRIES = ("trady_selected", "trady_offset", "trady_merged_index", "trady_merged_weight")
_PEFT_PREFIX = "base_model.model."


class StateDictMixin:
    """peft's state-dict hooks, implemented by :class:`~hf_collapse.trady.TraDyModel`."""

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: TraDyConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, TraDyLayer) or adapter_name not in module.trady_selected:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            weight = module.get_base_layer().weight.detach()
            to_return[f"{name}.trady_selected.{adapter_name}"] = module.trady_selected[adapter_name].cpu().clone()
            to_return[f"{name}.trady_offset.{adapter_name}"] = torch.tensor([module.trady_offset[adapter_name]])
            merged = module.trady_merged[adapter_name].nonzero().flatten().cpu()
            if merged.numel():
                to_return[f"{name}.trady_merged_index.{adapter_name}"] = merged.cpu().clone()
                to_return[f"{name}.trady_merged_weight.{adapter_name}"] = (
                    module.ops.read_slice(weight, merged.to(weight.device)).contiguous().clone())
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: TraDyConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layers = {name: module for name, module in model.named_modules() if isinstance(module, TraDyLayer)}
        entries: dict[str, dict[str, torch.Tensor]] = {}
        remaining = {}
        for key, value in state_dict.items():
            for entry in _LAYER_ENTRIES:
                if key.endswith("." + entry):
                    entries.setdefault(key[: -len(entry) - 1], {})[entry] = value
                    break
            else:
                remaining[key] = value
        if entries:
            for layer in layers.values():
                if adapter_name in layer.trady_selected:
                    layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
        for module_key, values in entries.items():
            layer = layers.get(module_key) or layers.get(module_key.removeprefix(_PEFT_PREFIX))
            if layer is None:
                raise ValueError(f"the adapter checkpoint has TraDy entries for {module_key!r}, which is not a TraDy "
                                 "layer of this model: is it the base model the adapter was trained on?")
            weight = layer.get_base_layer().weight
            layer.trady_merged[adapter_name] = layer.trady_merged[adapter_name].to(weight.device)
            if "trady_merged_index" in values:
                index = values["trady_merged_index"].long().to(weight.device)
                with torch.no_grad():
                    layer.ops.write_slice(weight.data, index, values["trady_merged_weight"].to(weight.device))
                layer.trady_merged[adapter_name][index] = True
            if "trady_selected" in values:
                offset = int(values["trady_offset"].reshape(-1)[0]) if "trady_offset" in values else 0
                layer.set_selection(adapter_name, values["trady_selected"].long(), offset)
        cls._size_placeholder_for(model, adapter_name, remaining)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, remaining)

    @classmethod
    def _size_placeholder_for(cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Loading a checkpoint into an adapter not calibrated yet (a Trainer resuming an auto-calibrated run): give
        the placeholder flat parameter the saved size, in place, before the optimizer is built; the calibration
        itself comes back with the run state (:meth:`~hf_collapse.trady.TraDyModel.restore_run_state`)."""
        saved = next((v for k, v in state_dict.items() if k.endswith("trady_flat")), None)
        tuner = next((m for m in model.modules() if isinstance(m, cls)), None)
        if saved is None or tuner is None or adapter_name not in tuner.trady_flat or tuner.is_calibrated(adapter_name):
            return
        if tuner.trady_flat[adapter_name].numel() != saved.numel():
            compat.resize_parameter_(tuner.trady_flat[adapter_name], saved.numel())

"""State dict: what a TraDy adapter checkpoint holds beyond the flat parameter, and how it is loaded back.

For every layer: the channels already merged into its base weight and their values (``trady_merged_index`` /
``trady_merged_weight``), the current selection and its offset in the flat parameter (``trady_selected`` /
``trady_offset``) and, once measured, the per-channel reweighted gradient norm (``trady_rgn``: what ``det_rgn`` draws
from, so that a reloaded or resumed ``det_rgn`` run draws as the uninterrupted one). With the flat parameter
(``trady_flat``) and the config, reload is exact. :class:`~hf_collapse.trady.TraDyModel`'s peft state-dict hooks call
the two functions here.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from .layer import TraDyLayer

__all__ = ["add_layer_entries", "load_layer_entries"]

_LAYER_ENTRIES = ("trady_selected", "trady_offset", "trady_merged_index", "trady_merged_weight", "trady_rgn")
_PEFT_PREFIX = "base_model.model."


def add_layer_entries(model: nn.Module, adapter_name: str, to_return: dict[str, torch.Tensor]) -> None:
    """Add every TraDy layer's entries (see the module docstring) to the adapter state dict ``to_return``."""
    for name, module in model.named_modules():
        if not isinstance(module, TraDyLayer) or adapter_name not in module.trady_selected:
            continue
        name = compat.strip_fsdp_prefix(name)
        weight = module.get_base_layer().weight.detach()
        to_return[f"{name}.trady_selected.{adapter_name}"] = module.trady_selected[adapter_name].cpu().clone()
        to_return[f"{name}.trady_offset.{adapter_name}"] = torch.tensor([module.trady_offset[adapter_name]])
        rgn = module.trady_rgn.get(adapter_name)
        if rgn is not None:
            to_return[f"{name}.trady_rgn.{adapter_name}"] = rgn.detach().float().cpu().clone()
        merged = module.trady_merged[adapter_name].nonzero().flatten().cpu()
        if merged.numel():
            to_return[f"{name}.trady_merged_index.{adapter_name}"] = merged.cpu().clone()
            to_return[f"{name}.trady_merged_weight.{adapter_name}"] = (
                module.ops.read_slice(weight, merged.to(weight.device)).contiguous().clone()
            )


def load_layer_entries(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply the TraDy layer entries of ``state_dict`` to ``model``'s layers (merged channels into the base weights,
    selections, RGN); returns the rest of the state dict (the flat parameter and peft's own entries)."""
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
            raise ValueError(
                f"the adapter checkpoint has TraDy entries for {module_key!r}, which is not a TraDy "
                "layer of this model: is it the base model the adapter was trained on?"
            )
        weight = layer.get_base_layer().weight
        layer.trady_merged[adapter_name] = layer.trady_merged[adapter_name].to(weight.device)
        if "trady_merged_index" in values:
            index = values["trady_merged_index"].long().to(weight.device)
            with torch.no_grad():
                layer.ops.write_slice(weight.data, index, values["trady_merged_weight"].to(weight.device))
            layer.trady_merged[adapter_name][index] = True
        if "trady_rgn" in values:
            layer.trady_rgn[adapter_name] = values["trady_rgn"].float().to(weight.device)
        if "trady_selected" in values:
            offset = int(values["trady_offset"].reshape(-1)[0]) if "trady_offset" in values else 0
            layer.set_selection(adapter_name, values["trady_selected"].long(), offset)
    return remaining

"""Sampling, as functions over a tuner and its state: the budget, the flat parameter, the channel draws and their
re-sampling (per epoch or per step), and the run state a checkpoint carries.

The flat parameter keeps its size when channels are re-sampled, so the optimizer and DDP keep working; its size
(the *capacity*) is fixed by the budget at calibration. Re-sampling merges the current update into the base weights,
zeroes the flat parameter and resets its optimizer state.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import compat
from .config import DEFAULT_BUDGET_RATIO, TraDyConfig
from .selection import (
    LayerCost,
    budget_elements,
    candidate_layers,
    draw_random_channels,
    draw_top_rgn_channels,
    flat_capacity,
    selection_generator,
)
from .sharding import check_not_sharded
from .state import AdapterState

if TYPE_CHECKING:  # pragma: no cover
    from .model import TraDyModel

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_CALIBRATED_MESSAGE",
    "budget_summary",
    "current_selection",
    "draw_index",
    "export_run_state",
    "optimizer_holds",
    "register_step_hook",
    "require_state",
    "resample",
    "reset_optimizer_state",
    "restore_run_state",
    "selection_history",
    "setup",
]

NOT_CALIBRATED_MESSAGE = (
    "TraDy is not calibrated: call hf_collapse.trady.calibrate(model, batches) before training (it measures the cost "
    "model, ranks the layers and sizes the trainable channel slices), or train with a transformers.Trainer given "
    "callbacks=[hf_collapse.trady.TraDyCallback()], which calibrates the adapter on the first batches of its training "
    "data when training begins"
)


def reset_optimizer_state(optimizer: Any, parameter: torch.Tensor) -> bool:
    """Forget the optimizer state (momentum, Adam moments and step) of ``parameter``; wrappers are unwrapped.

    Returns whether some state was dropped.

    Example::

        >>> reset_optimizer_state(trainer.optimizer, tuner.trady_flat["default"])   # doctest: +SKIP
        True
    """
    dropped = False
    for current in compat.unwrap_optimizer(optimizer):
        state = getattr(current, "state", None)
        if isinstance(state, dict) and parameter in state:
            del state[parameter]
            dropped = True
    return dropped


def optimizer_holds(optimizer: Any, parameter: torch.Tensor) -> bool:
    """Whether ``optimizer`` (one of its parameter groups) holds ``parameter`` itself."""
    for group in getattr(optimizer, "param_groups", []):
        if any(p is parameter for p in group.get("params", [])):
            return True
    return False


def setup(tuner: TraDyModel, adapter_name: str, keep_selection: bool = False) -> None:
    """Build the cost model from the config, size the flat parameter (in place: an optimizer holding it keeps
    working) and draw the first channels; with ``keep_selection`` the flat parameter and the selection are
    kept as they are (loaded from a checkpoint)."""
    config: TraDyConfig = tuner.peft_config[adapter_name]
    layers = tuner.trady_layers(adapter_name)
    positions = config.layer_positions or {}
    missing = [n for n in layers if n not in positions]
    if missing:
        raise ValueError(
            f"layer_positions lacks {len(missing)} TraDy layer(s) ({missing[:3]} ...): run "
            "hf_collapse.trady.calibrate(model, batches)"
        )
    order = [n for n in positions if n in layers]
    costs = [LayerCost(n, layers[n].in_channels, layers[n].weight_per_channel, float(positions[n])) for n in order]
    first = next(iter(layers.values())).get_base_layer().weight
    budget = budget_elements(
        costs,
        config.budget_elements,
        config.budget_ratio,
        DEFAULT_BUDGET_RATIO,
        budget_bytes=getattr(config, "budget_bytes", None),
        bytes_per_element=first.element_size(),
    )
    candidates = candidate_layers(order, config.max_depth)
    if config.selection == "full_random":
        pool_names = candidates
    else:
        if config.selected_layers is None:
            raise ValueError(
                f"selection={config.selection!r} needs the a priori layer ranking: run "
                "hf_collapse.trady.calibrate(model, batches) or pass selected_layers"
            )
        unknown = sorted(set(config.selected_layers) - set(layers))
        if unknown:
            raise ValueError(f"selected_layers names layers that are not TraDy layers of this model: {unknown[:5]}")
        pool_names = [n for n in candidates if n in set(config.selected_layers)]
        if not pool_names:
            raise ValueError(
                f"no selected layer lies within max_depth={config.max_depth} (the last "
                f"{config.max_depth} target layers); selected: {config.selected_layers[:5]}"
            )
    by_name = {c.name: c for c in costs}
    pool = [by_name[n] for n in pool_names]
    cheapest = min(pool, key=lambda c: c.channel_cost)
    if budget < cheapest.channel_cost:
        raise ValueError(
            f"the memory budget ({budget:.0f} elements, {config.budget_description}) cannot hold a single channel: "
            f"the cheapest channel of the candidate layers ({cheapest.name}) costs {cheapest.channel_cost:.0f} "
            f"elements ({cheapest.weight_per_channel} weight-gradient + {cheapest.positions:.0f} activation per "
            "sample). Raise budget_elements, budget_bytes or budget_ratio."
        )
    capacity = flat_capacity(pool, budget)
    requires_grad = not config.inference_mode
    if adapter_name not in tuner.trady_flat:
        tuner.trady_flat[adapter_name] = nn.Parameter(torch.zeros(0, dtype=first.dtype, device=first.device))
    flat = tuner.trady_flat[adapter_name]
    if keep_selection and flat.numel() != capacity:
        raise RuntimeError(
            f"the TraDy checkpoint does not match this adapter: its flat parameter has "
            f"{flat.numel()} elements where the saved calibration gives {capacity}; resume with the "
            "base model and the TraDyConfig the checkpoint was trained with"
        )
    if not keep_selection:
        compat.resize_parameter_(flat, capacity)
    flat.requires_grad_(requires_grad)
    previous = tuner.trady_state.adapters.get(adapter_name)
    tuner.trady_state.adapters[adapter_name] = AdapterState(costs=costs, pool=pool, budget=budget, capacity=capacity)
    if previous is not None:
        tuner.trady_state.adapters[adapter_name].steps = previous.steps
        tuner.trady_state.adapters[adapter_name].history = previous.history
    if keep_selection:
        return
    for layer in layers.values():
        layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
    if config.selection == "det_rgn" and any(layers[c.name].trady_rgn.get(adapter_name) is None for c in pool):
        # No channel RGN yet: an adapter being loaded (PeftModel.from_pretrained, a resumed checkpoint), whose
        # saved selection and RGN arrive with its weights right after injection. Training without them refuses.
        return
    _assign(tuner, adapter_name, _draw(tuner, adapter_name, 0))
    tuner.trady_state.adapters[adapter_name].index = 0
    _record(tuner, adapter_name, 0)


def _draw(tuner: TraDyModel, adapter_name: str, index: int) -> dict[str, list[int]]:
    config: TraDyConfig = tuner.peft_config[adapter_name]
    state = tuner.trady_state.adapters[adapter_name]
    if config.selection == "det_rgn":
        layers = tuner.trady_layers(adapter_name)
        rgn = {c.name: layers[c.name].trady_rgn.get(adapter_name) for c in state.pool}
        return draw_top_rgn_channels(state.pool, rgn, state.budget, state.capacity)
    draw_index = 0 if config.selection == "static_topk_random" else index
    return draw_random_channels(state.pool, state.budget, state.capacity, selection_generator(config.seed, draw_index))


def _assign(tuner: TraDyModel, adapter_name: str, selection: Mapping[str, list[int]]) -> None:
    layers = tuner.trady_layers(adapter_name)
    offset = 0
    for cost in tuner.trady_state.adapters[adapter_name].pool:
        channels = selection.get(cost.name, [])
        layers[cost.name].set_selection(adapter_name, torch.tensor(channels, dtype=torch.long), offset)
        offset += len(channels) * cost.weight_per_channel
    for name, layer in layers.items():
        if name not in selection:
            layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
    if offset > tuner.trady_flat[adapter_name].numel():  # pragma: no cover - the draws respect the capacity
        raise RuntimeError(f"TraDy selection needs {offset} elements, more than the capacity")


def _record(tuner: TraDyModel, adapter_name: str, index: int) -> None:
    counts = {n: len(c) for n, c in current_selection(tuner, adapter_name).items()}
    tuner.trady_state.adapters[adapter_name].history.append((index, counts))


def resample(tuner: TraDyModel, index: int, optimizer: Any = None, adapter_name: str | None = None) -> bool:
    """Draw the channels of epoch (or re-sampling step) ``index``.

    Before the new draw the current update is merged into the base weights and the flat parameter is zeroed;
    the optimizer state of the flat parameter (momentum, Adam moments) is reset, since its slices now belong
    to other channels. A draw identical to the current one changes nothing (``static_topk_random``).

    Returns:
        Whether the selection changed.
    """
    adapter_name = adapter_name or tuner.active_adapter_name()
    state = require_state(tuner, adapter_name)
    check_not_sharded(tuner.model, action="re-sample (merge updates into the base weights)")
    tuner.trady_state.driven = True  # something drives the re-sampling: no warning
    new = _draw(tuner, adapter_name, index)
    if new == current_selection(tuner, adapter_name):
        state.index = index
        return False
    layers = tuner.trady_layers(adapter_name)
    flat = tuner.trady_flat[adapter_name]
    with torch.no_grad():
        for layer in layers.values():
            layer.merge_current(adapter_name)
        flat.zero_()
        if flat.grad is not None:
            flat.grad.zero_()
    _assign(tuner, adapter_name, new)
    if optimizer is not None:
        reset_optimizer_state(optimizer, flat)
    state.index = index
    state.last_version = compat.tensor_version(flat)
    _record(tuner, adapter_name, index)
    logger.info(
        "TraDy: re-sampled %d channels in %d layers (index %d)", sum(len(c) for c in new.values()), len(new), index
    )
    return True


def require_state(tuner: TraDyModel, adapter_name: str) -> AdapterState:
    if adapter_name not in tuner.trady_state.adapters:
        raise RuntimeError(NOT_CALIBRATED_MESSAGE)
    return tuner.trady_state.adapters[adapter_name]


def draw_index(tuner: TraDyModel, adapter_name: str | None = None) -> int | None:
    """The epoch (or re-sampling step) whose channels are selected now; ``None`` before the first draw."""
    state = tuner.trady_state.adapters.get(adapter_name or tuner.active_adapter_name())
    return None if state is None else state.index


def is_calibrated(tuner: TraDyModel, adapter_name: str | None = None) -> bool:
    """Whether the flat parameter is allocated and channels are drawn."""
    return (adapter_name or tuner.active_adapter_name()) in tuner.trady_state.adapters


def current_selection(tuner: TraDyModel, adapter_name: str | None = None) -> dict[str, list[int]]:
    """``{layer name: selected input channels}`` for the layers with at least one channel selected."""
    adapter_name = adapter_name or tuner.active_adapter_name()
    return {
        name: layer.selected_channels(adapter_name)
        for name, layer in tuner.trady_layers(adapter_name).items()
        if layer.trady_selected[adapter_name].numel()
    }


def selection_history(tuner: TraDyModel, adapter_name: str | None = None) -> list[tuple[int, dict[str, int]]]:
    """``[(index, {layer: channels selected})]`` for every draw so far (the first is the calibration's)."""
    return list(require_state(tuner, adapter_name or tuner.active_adapter_name()).history)


def budget_summary(tuner: TraDyModel, adapter_name: str | None = None) -> dict[str, Any]:
    """The cost model's numbers for the current selection (elements, per sample; ``*_bytes``: the same in bytes
    of the target weights' dtype)."""
    adapter_name = adapter_name or tuner.active_adapter_name()
    state = require_state(tuner, adapter_name)
    selection = current_selection(tuner, adapter_name)
    by_name = {c.name: c for c in state.costs}
    used_weight = sum(len(ch) * by_name[n].weight_per_channel for n, ch in selection.items())
    used_activation = sum(len(ch) * by_name[n].positions for n, ch in selection.items())
    full = sum(c.full_cost for c in state.costs)
    element_size = tuner.trady_flat[adapter_name].element_size()
    return {
        "budget_elements": state.budget,
        "budget_bytes": state.budget * element_size,
        "used_bytes": (used_weight + used_activation) * element_size,
        "used_elements": used_weight + used_activation,
        "used_weight_elements": used_weight,
        "used_activation_elements_per_sample": used_activation,
        "full_cost_elements": full,
        "capacity": state.capacity,
        "channels": sum(len(ch) for ch in selection.values()),
        "layers_with_channels": len(selection),
        "pool_layers": [c.name for c in state.pool],
        "index": state.index,
    }


# ------------------------------------------------------------------------------------------- run state


def export_run_state(tuner: TraDyModel, adapter_name: str | None = None) -> dict[str, Any] | None:
    """What shapes the rest of a run and is neither in the adapter checkpoint nor derivable from the step: the
    calibration (cost model and layer ranking), the draw index and the optimizer steps counted for
    ``resample_every_steps``. JSON-serialisable; ``None`` before calibration. :class:`TraDyCallback` saves it
    with every Trainer checkpoint."""
    adapter_name = adapter_name or tuner.active_adapter_name()
    if adapter_name not in tuner.trady_state.adapters:
        return None
    config: TraDyConfig = tuner.peft_config[adapter_name]
    state = tuner.trady_state.adapters[adapter_name]
    return {
        "draw_index": state.index,
        "optimizer_steps": state.steps,
        # [name, value] pairs: the forward order is part of the cost model, and trainer_state.json sorts keys
        "calibration": {
            "layer_positions": [[n, v] for n, v in (config.layer_positions or {}).items()],
            "selected_layers": None if config.selected_layers is None else list(config.selected_layers),
            "layer_rgn": None if config.layer_rgn is None else [[n, v] for n, v in config.layer_rgn.items()],
        },
    }


def restore_run_state(tuner: TraDyModel, saved: Mapping[str, Any], adapter_name: str | None = None) -> None:
    """Continue a run from :meth:`export_run_state`'s record, after its adapter checkpoint was loaded (flat
    parameter, selection and merged channels): the calibration is taken from the record, not measured again."""
    adapter_name = adapter_name or tuner.active_adapter_name()
    config: TraDyConfig = tuner.peft_config[adapter_name]
    calibration = saved["calibration"]
    config.layer_positions = {n: float(v) for n, v in calibration["layer_positions"]}
    config.selected_layers = calibration.get("selected_layers")
    rgn = calibration.get("layer_rgn")
    config.layer_rgn = None if rgn is None else {n: float(v) for n, v in rgn}
    setup(tuner, adapter_name, keep_selection=True)
    state = tuner.trady_state.adapters[adapter_name]
    state.index = saved.get("draw_index")
    state.steps = int(saved.get("optimizer_steps") or 0)
    state.last_version = compat.tensor_version(tuner.trady_flat[adapter_name])
    logger.info("TraDy: resumed at draw %s after %d optimizer steps", state.index, state.steps)


# ------------------------------------------------------------------------------------------- optimizer hook


def register_step_hook(tuner: TraDyModel) -> None:
    """Count the optimizer steps that update the tuner's flat parameter (``resample_every_steps`` re-samples from
    there): a hook on every torch optimizer's step, removed when the tuner is garbage-collected."""
    if tuner.trady_state.step_hook is not None:
        return
    reference = weakref.ref(tuner)

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        live = reference()
        if live is not None:
            _after_optimizer_step(live, optimizer)

    handle = compat.register_optimizer_step_post_hook(hook)
    tuner.trady_state.step_hook = handle
    weakref.finalize(tuner, handle.remove)


def _after_optimizer_step(tuner: TraDyModel, optimizer: Any) -> None:
    for adapter_name, state in list(tuner.trady_state.adapters.items()):
        flat = tuner.trady_flat[adapter_name] if adapter_name in tuner.trady_flat else None
        # One count per update of the flat parameter, even when a wrapper and its inner optimizer both fire.
        if flat is None or compat.tensor_version(flat) == state.last_version or not optimizer_holds(optimizer, flat):
            continue
        state.last_version = compat.tensor_version(flat)
        state.steps += 1
        every = tuner.peft_config[adapter_name].resample_every_steps
        if every:
            if state.steps % int(every) == 0:
                resample(tuner, state.steps // int(every), optimizer, adapter_name)
        elif not tuner.trady_state.driven and not state.warned_no_callback:
            state.warned_no_callback = True
            logger.warning(
                "TraDy: nothing re-samples the channels at epoch boundaries, so the first draw trains until "
                "the end. Pass callbacks=[hf_collapse.trady.TraDyCallback()] to the Trainer, set "
                "resample_every_steps, or call model.base_model.resample(epoch, optimizer) at each "
                "epoch of your own loop."
            )

"""Sampling: the budget, the flat parameter, the channel draws and their re-sampling (per epoch or per step).

The flat parameter keeps its size when channels are re-sampled, so the optimizer and DDP keep working; its size
(the *capacity*) is fixed by the budget at calibration. Re-sampling merges the current update into the base weights,
zeroes the flat parameter and resets its optimizer state.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .. import compat
from .config import DEFAULT_BUDGET_RATIO, TraDyConfig
from .sharding import check_not_sharded
from .selection import (
    LayerCost,
    budget_elements,
    candidate_layers,
    draw_random_channels,
    draw_top_rgn_channels,
    flat_capacity,
    selection_generator,
)

logger = logging.getLogger(__name__)

__all__ = ["SamplingMixin", "reset_optimizer_state"]


@dataclass
class _AdapterState:
    """What a calibrated adapter needs to draw channels (not saved: rebuilt from the config)."""

    costs: list[LayerCost]  # every target layer, forward order
    pool: list[LayerCost]  # the layers the strategy draws from
    budget: float
    capacity: int
    index: Optional[int] = None  # epoch / re-sampling index of the current draw
    steps: int = 0  # optimizer steps counted by the hook
    last_version: int = -1
    warned_no_callback: bool = False
    history: list[tuple[int, dict[str, int]]] = field(default_factory=list)


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


def _optimizer_holds(optimizer: Any, parameter: torch.Tensor) -> bool:
    for group in getattr(optimizer, "param_groups", []):
        if any(p is parameter for p in group.get("params", [])):
            return True
    return False



class SamplingMixin:
    """The budget, draws and re-sampling methods of :class:`~hf_collapse.trady.TraDyModel`."""

    def _setup(self, adapter_name: str, keep_selection: bool = False) -> None:
        """Build the cost model from the config, size the flat parameter (in place: an optimizer holding it keeps
        working) and draw the first channels; with ``keep_selection`` the flat parameter and the selection are
        kept as they are (loaded from a checkpoint)."""
        config: TraDyConfig = self.peft_config[adapter_name]
        layers = self.trady_layers(adapter_name)
        positions = config.layer_positions or {}
        missing = [n for n in layers if n not in positions]
        if missing:
            raise ValueError(f"layer_positions lacks {len(missing)} TraDy layer(s) ({missing[:3]} ...): run "
                             "hf_collapse.trady.calibrate(model, batches)")
        order = [n for n in positions if n in layers]
        costs = [LayerCost(n, layers[n].in_channels, layers[n].weight_per_channel, float(positions[n])) for n in order]
        first = next(iter(layers.values())).get_base_layer().weight
        budget = budget_elements(costs, config.memory_budget, config.budget_ratio, DEFAULT_BUDGET_RATIO,
                                 budget_bytes=getattr(config, "budget_bytes", None),
                                 bytes_per_element=first.element_size())
        candidates = candidate_layers(order, config.max_depth)
        if config.selection == "full_random":
            pool_names = candidates
        else:
            if config.selected_layers is None:
                raise ValueError(f"selection={config.selection!r} needs the a priori layer ranking: run "
                                 "hf_collapse.trady.calibrate(model, batches) or pass selected_layers")
            unknown = sorted(set(config.selected_layers) - set(layers))
            if unknown:
                raise ValueError(f"selected_layers names layers that are not TraDy layers of this model: {unknown[:5]}")
            pool_names = [n for n in candidates if n in set(config.selected_layers)]
            if not pool_names:
                raise ValueError(f"no selected layer lies within max_depth={config.max_depth} (the last "
                                 f"{config.max_depth} target layers); selected: {config.selected_layers[:5]}")
        by_name = {c.name: c for c in costs}
        pool = [by_name[n] for n in pool_names]
        cheapest = min(pool, key=lambda c: c.channel_cost)
        if budget < cheapest.channel_cost:
            raise ValueError(
                f"the memory budget ({budget:.0f} elements, {config.budget_description}) cannot hold a single channel: "
                f"the cheapest channel of the candidate layers ({cheapest.name}) costs {cheapest.channel_cost:.0f} "
                f"elements ({cheapest.weight_per_channel} weight-gradient + {cheapest.positions:.0f} activation per "
                "sample). Raise memory_budget, budget_bytes or budget_ratio.")
        capacity = flat_capacity(pool, budget)
        requires_grad = not config.inference_mode
        if adapter_name not in self.trady_flat:
            self.trady_flat[adapter_name] = nn.Parameter(torch.zeros(0, dtype=first.dtype, device=first.device))
        flat = self.trady_flat[adapter_name]
        if keep_selection and flat.numel() != capacity:
            raise RuntimeError(f"the TraDy checkpoint does not match this adapter: its flat parameter has "
                               f"{flat.numel()} elements where the saved calibration gives {capacity}; resume with the "
                               "base model and the TraDyConfig the checkpoint was trained with")
        if not keep_selection:
            compat.resize_parameter_(flat, capacity)
        flat.requires_grad_(requires_grad)
        previous = self._states.get(adapter_name)
        self._states[adapter_name] = _AdapterState(costs=costs, pool=pool, budget=budget, capacity=capacity)
        if previous is not None:
            self._states[adapter_name].steps = previous.steps
            self._states[adapter_name].history = previous.history
        if keep_selection:
            return
        for layer in layers.values():
            layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
        self._assign(adapter_name, self._draw(adapter_name, 0))
        self._states[adapter_name].index = 0
        self._record(adapter_name, 0)

    def _draw(self, adapter_name: str, index: int) -> dict[str, list[int]]:
        config: TraDyConfig = self.peft_config[adapter_name]
        state = self._states[adapter_name]
        if config.selection == "det_rgn":
            layers = self.trady_layers(adapter_name)
            rgn = {c.name: layers[c.name].trady_rgn.get(adapter_name) for c in state.pool}
            return draw_top_rgn_channels(state.pool, rgn, state.budget, state.capacity)
        draw_index = 0 if config.selection == "static_topk_random" else index
        return draw_random_channels(state.pool, state.budget, state.capacity,
                                    selection_generator(config.seed, draw_index))

    def _assign(self, adapter_name: str, selection: Mapping[str, list[int]]) -> None:
        layers = self.trady_layers(adapter_name)
        offset = 0
        for cost in self._states[adapter_name].pool:
            channels = selection.get(cost.name, [])
            layers[cost.name].set_selection(adapter_name, torch.tensor(channels, dtype=torch.long), offset)
            offset += len(channels) * cost.weight_per_channel
        for name, layer in layers.items():
            if name not in selection:
                layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
        if offset > self.trady_flat[adapter_name].numel():  # pragma: no cover - the draws respect the capacity
            raise RuntimeError(f"TraDy selection needs {offset} elements, more than the capacity")

    def _record(self, adapter_name: str, index: int) -> None:
        counts = {n: len(c) for n, c in self.current_selection(adapter_name).items()}
        self._states[adapter_name].history.append((index, counts))

    def resample(self, index: int, optimizer: Any = None, adapter_name: Optional[str] = None) -> bool:
        """Draw the channels of epoch (or re-sampling step) ``index``.

        Before the new draw the current update is merged into the base weights and the flat parameter is zeroed;
        the optimizer state of the flat parameter (momentum, Adam moments) is reset, since its slices now belong
        to other channels. A draw identical to the current one changes nothing (``static_topk_random``).

        Returns:
            Whether the selection changed.
        """
        adapter_name = adapter_name or self._adapter()
        state = self._require_state(adapter_name)
        check_not_sharded(self.model, action="re-sample (merge updates into the base weights)")
        self.__dict__["_callback_attached"] = True  # something drives the re-sampling: no warning
        new = self._draw(adapter_name, index)
        if new == self.current_selection(adapter_name):
            state.index = index
            return False
        layers = self.trady_layers(adapter_name)
        flat = self.trady_flat[adapter_name]
        with torch.no_grad():
            for layer in layers.values():
                layer.merge_current(adapter_name)
            flat.zero_()
            if flat.grad is not None:
                flat.grad.zero_()
        self._assign(adapter_name, new)
        if optimizer is not None:
            reset_optimizer_state(optimizer, flat)
        state.index = index
        state.last_version = compat.tensor_version(flat)
        self._record(adapter_name, index)
        logger.info("TraDy: re-sampled %d channels in %d layers (index %d)",
                    sum(len(c) for c in new.values()), len(new), index)
        return True

    def _require_state(self, adapter_name: str) -> _AdapterState:
        if adapter_name not in self._states:
            from .calibration import NOT_CALIBRATED_MESSAGE

            raise RuntimeError(NOT_CALIBRATED_MESSAGE)
        return self._states[adapter_name]

    def is_calibrated(self, adapter_name: Optional[str] = None) -> bool:
        """Whether the flat parameter is allocated and channels are drawn."""
        return (adapter_name or self._adapter()) in self._states

    def current_selection(self, adapter_name: Optional[str] = None) -> dict[str, list[int]]:
        """``{layer name: selected input channels}`` for the layers with at least one channel selected."""
        adapter_name = adapter_name or self._adapter()
        return {name: layer.selected_channels(adapter_name) for name, layer in self.trady_layers(adapter_name).items()
                if layer.trady_selected[adapter_name].numel()}

    def selection_history(self, adapter_name: Optional[str] = None) -> list[tuple[int, dict[str, int]]]:
        """``[(index, {layer: channels selected})]`` for every draw so far (the first is the calibration's)."""
        return list(self._require_state(adapter_name or self._adapter()).history)

    def budget_summary(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """The cost model's numbers for the current selection (elements, per sample; ``*_bytes``: the same in bytes
        of the target weights' dtype)."""
        adapter_name = adapter_name or self._adapter()
        state = self._require_state(adapter_name)
        selection = self.current_selection(adapter_name)
        by_name = {c.name: c for c in state.costs}
        used_weight = sum(len(ch) * by_name[n].weight_per_channel for n, ch in selection.items())
        used_activation = sum(len(ch) * by_name[n].positions for n, ch in selection.items())
        full = sum(c.full_cost for c in state.costs)
        element_size = self.trady_flat[adapter_name].element_size()
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

    def export_run_state(self, adapter_name: Optional[str] = None) -> Optional[dict[str, Any]]:
        """What shapes the rest of a run and is neither in the adapter checkpoint nor derivable from the step: the
        calibration (cost model and layer ranking), the draw index and the optimizer steps counted for
        ``resample_every_steps``. JSON-serialisable; ``None`` before calibration. :class:`TraDyCallback` saves it
        with every Trainer checkpoint."""
        adapter_name = adapter_name or self._adapter()
        if adapter_name not in self._states:
            return None
        config: TraDyConfig = self.peft_config[adapter_name]
        state = self._states[adapter_name]
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

    def restore_run_state(self, saved: Mapping[str, Any], adapter_name: Optional[str] = None) -> None:
        """Continue a run from :meth:`export_run_state`'s record, after its adapter checkpoint was loaded (flat
        parameter, selection and merged channels): the calibration is taken from the record, not measured again."""
        adapter_name = adapter_name or self._adapter()
        config: TraDyConfig = self.peft_config[adapter_name]
        calibration = saved["calibration"]
        config.layer_positions = {n: float(v) for n, v in calibration["layer_positions"]}
        config.selected_layers = calibration.get("selected_layers")
        rgn = calibration.get("layer_rgn")
        config.layer_rgn = None if rgn is None else {n: float(v) for n, v in rgn}
        self._setup(adapter_name, keep_selection=True)
        state = self._states[adapter_name]
        state.index = saved.get("draw_index")
        state.steps = int(saved.get("optimizer_steps") or 0)
        state.last_version = compat.tensor_version(self.trady_flat[adapter_name])
        logger.info("TraDy: resumed at draw %s after %d optimizer steps", state.index, state.steps)

    # ------------------------------------------------------------------------------------------- optimizer hook

    def _register_step_hook(self) -> None:
        if "_step_hook" in self.__dict__:
            return
        reference = weakref.ref(self)

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            tuner = reference()
            if tuner is not None:
                tuner._after_optimizer_step(optimizer)

        handle = compat.register_optimizer_step_post_hook(hook)
        self.__dict__["_step_hook"] = handle
        weakref.finalize(self, handle.remove)

    def _after_optimizer_step(self, optimizer: Any) -> None:
        for adapter_name, state in list(self._states.items()):
            flat = self.trady_flat[adapter_name] if adapter_name in self.trady_flat else None
            # One count per update of the flat parameter, even when a wrapper and its inner optimizer both fire.
            if (flat is None or compat.tensor_version(flat) == state.last_version
                    or not _optimizer_holds(optimizer, flat)):
                continue
            state.last_version = compat.tensor_version(flat)
            state.steps += 1
            every = self.peft_config[adapter_name].resample_every_steps
            if every:
                if state.steps % int(every) == 0:
                    self.resample(state.steps // int(every), optimizer, adapter_name)
            elif not self._callback_attached and not state.warned_no_callback:
                state.warned_no_callback = True
                logger.warning("TraDy: trained outside a transformers.Trainer, so channels will not be re-sampled at "
                               "epoch boundaries. Call model.base_model.resample(epoch, optimizer) yourself at each "
                               "epoch, or set resample_every_steps.")

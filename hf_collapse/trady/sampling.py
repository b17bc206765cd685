"""The channel sampler of a TraDy adapter: the budget, the flat parameter's size, the channel draws and their
re-sampling (per epoch or per step), and the run state a checkpoint carries.

:class:`ChannelSampler` is one object, owned by the tuner (``tuner.sampler()``), as peft's AdaLoRA tuner owns its
``RankAllocator``: it sees the tuner's layers and flat parameter, never the tuner. The flat parameter keeps its size
when channels are re-sampled, so the optimizer and DDP keep working; its size (the *capacity*) is fixed by the budget
at calibration. Re-sampling merges the current update into the base weights, zeroes the flat parameter and resets
its optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .. import compat
from .config import DEFAULT_BUDGET_RATIO, TraDyConfig
from .layer import TraDyLayer
from .selection import (
    LayerCost,
    budget_elements,
    candidate_layers,
    fill_in_order,
    flat_capacity,
)
from .sharding import check_not_sharded
from .strategies import SELECTIONS

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_CALIBRATED_MESSAGE",
    "ChannelSampler",
    "channel_budget",
    "layer_costs",
    "optimizer_holds",
    "reset_optimizer_state",
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


def layer_costs(config: TraDyConfig, layers: Mapping[str, TraDyLayer]) -> list[LayerCost]:
    """The cost model of every TraDy layer, in forward order (``config.layer_positions``'s, from calibration).

    Raises:
        ValueError: when the calibration did not measure every layer.
    """
    positions = config.layer_positions or {}
    missing = [n for n in layers if n not in positions]
    if missing:
        raise ValueError(
            f"layer_positions lacks {len(missing)} TraDy layer(s) ({missing[:3]} ...): run "
            "hf_collapse.trady.calibrate(model, batches)"
        )
    return [
        LayerCost(n, layers[n].in_channels, layers[n].weight_per_channel, float(positions[n]))
        for n in positions
        if n in layers
    ]


def channel_budget(config: TraDyConfig, costs: list[LayerCost], bytes_per_element: int) -> float:
    """The channel budget the config gives, in elements (``budget_elements``, ``budget_bytes`` or ``budget_ratio``,
    the default ratio when none is given)."""
    return budget_elements(
        costs,
        config.budget_elements,
        config.budget_ratio,
        DEFAULT_BUDGET_RATIO,
        budget_bytes=config.budget_bytes,
        bytes_per_element=bytes_per_element,
    )


class ChannelSampler:
    """The channel draws of one TraDy adapter: the cost model, the layers drawn from, the budget, the flat
    parameter's capacity, the current draw and its history, and the optimizer steps counted for
    ``resample_every_steps``.

    Built from a calibrated config (``layer_positions``, and ``selected_layers`` unless ``selection="full_random"``):
    building it checks the budget against the pool; :meth:`start` then sizes the flat parameter (in place: an
    optimizer holding it keeps working) and draws the first channels, or :meth:`adopt` keeps a flat parameter and a
    selection loaded from a checkpoint.

    Args:
        config: the adapter's config.
        layers: the adapter's TraDy layers by name (relative to the base model).
        flat: the adapter's flat trainable parameter.
        adapter_name: the adapter's name (the key of its slices in every layer).
        model: the base model, checked for sharded parameters before updates are merged into it.

    Attributes:
        costs: the cost model of every target layer, in forward order.
        pool: the layers the strategy draws from.
        budget: the budget in elements.
        capacity: the size of the flat parameter.
        index: the epoch / re-sampling index of the current draw (``None`` before the first one).
        steps: optimizer steps counted by the tuner's optimizer hook.
        history: ``(index, {layer: channels})`` of every draw so far.

    Example::

        >>> sampler = peft_model.base_model.sampler()        # doctest: +SKIP
        >>> sampler.capacity, [c.name for c in sampler.pool]   # doctest: +SKIP
        (16020, ['model.layers.29.mlp.down_proj', ...])
    """

    def __init__(
        self,
        config: TraDyConfig,
        layers: Mapping[str, TraDyLayer],
        flat: nn.Parameter,
        adapter_name: str,
        model: nn.Module,
    ) -> None:
        self.config, self.flat, self.adapter_name, self.model = config, flat, adapter_name, model
        self.strategy = SELECTIONS.get(config.selection)
        self.costs = layer_costs(config, layers)
        self.layers = {c.name: layers[c.name] for c in self.costs}  # forward order
        plan = config.peak_plan or {}
        if plan:  # a peak budget's plan (hf_collapse.trady.planning): its channel budget and depth
            self.budget = float(plan["budget_elements"])
        else:
            self.budget = channel_budget(config, self.costs, flat.element_size())
        self.max_depth = plan["max_depth"] if plan.get("max_depth") is not None else config.max_depth
        self.pool = self._pool()
        cheapest = min(self.pool, key=lambda c: c.channel_cost)
        if self.budget < cheapest.channel_cost:
            raise ValueError(
                f"the memory budget ({self.budget:.0f} elements, {config.budget_description}) cannot hold a single "
                f"channel: the cheapest channel of the candidate layers ({cheapest.name}) costs "
                f"{cheapest.channel_cost:.0f} elements ({cheapest.weight_per_channel} weight-gradient + "
                f"{cheapest.positions:.0f} activation per sample). Raise budget_elements, budget_bytes or budget_ratio."
            )
        self.capacity = flat_capacity(self.pool, self.budget)
        self.index: int | None = None
        self.steps = 0
        self.last_version = -1  # the flat parameter's version at the last counted step (one count per update)
        self.warned_no_callback = False
        self.history: list[tuple[int, dict[str, int]]] = []

    def _pool(self) -> list[LayerCost]:
        config = self.config
        candidates = candidate_layers(list(self.layers), self.max_depth)
        if not self.strategy.ranks_layers:
            names = candidates
        else:
            if config.selected_layers is None:
                raise ValueError(
                    f"selection={config.selection!r} needs the a priori layer ranking: run "
                    "hf_collapse.trady.calibrate(model, batches) or pass selected_layers"
                )
            unknown = sorted(set(config.selected_layers) - set(self.layers))
            if unknown:
                raise ValueError(f"selected_layers names layers that are not TraDy layers of this model: {unknown[:5]}")
            names = [n for n in candidates if n in set(config.selected_layers)]
            if not names:
                raise ValueError(
                    f"no selected layer lies within max_depth={self.max_depth} (the last "
                    f"{self.max_depth} target layers); selected: {config.selected_layers[:5]}"
                )
        by_name = {c.name: c for c in self.costs}
        return [by_name[n] for n in names]

    # ------------------------------------------------------------------------------------------- the first draw

    def start(self) -> None:
        """Size the flat parameter to the capacity (zeros, in place) and draw the channels of index 0. A ``det_rgn``
        adapter without channel RGN yet (being loaded: its saved selection and RGN arrive with its weights right
        after injection) gets no draw; training it without them refuses."""
        compat.resize_parameter_(self.flat, self.capacity)
        self.flat.requires_grad_(not self.config.inference_mode)
        for layer in self.layers.values():
            layer.set_selection(self.adapter_name, torch.zeros(0, dtype=torch.long), 0)
        if self.strategy.needs_channel_rgn and any(
            self.layers[c.name].trady_rgn.get(self.adapter_name) is None for c in self.pool
        ):
            return
        self._assign(self._draw(0))
        self.index = 0
        self._record(0)

    def adopt(self) -> None:
        """Keep the flat parameter and the selection as loaded from a checkpoint.

        Raises:
            RuntimeError: when the loaded flat parameter's size is not the capacity this calibration gives.
        """
        if self.flat.numel() != self.capacity:
            raise RuntimeError(
                f"the TraDy checkpoint does not match this adapter: its flat parameter has "
                f"{self.flat.numel()} elements where the saved calibration gives {self.capacity}; resume with the "
                "base model and the TraDyConfig the checkpoint was trained with"
            )
        self.flat.requires_grad_(not self.config.inference_mode)
        self.last_version = compat.tensor_version(self.flat)

    # ------------------------------------------------------------------------------------------- draws

    def _draw(self, index: int) -> dict[str, list[int]]:
        def rgn() -> dict[str, torch.Tensor]:
            return {c.name: self.layers[c.name].trady_rgn.get(self.adapter_name) for c in self.pool}

        return self.strategy.draw(self.pool, self.budget, self.capacity, self.config.seed, index, rgn)

    def assign_deepest(self) -> None:
        """Select the heaviest draw the plan allows, to be measured: channels taken one per layer in turn, from the
        lowest layer of the pool upward, until the budget is full. The backward pass runs down to the lowest selected
        layer, and every layer with a channel adds its own temporaries; the channels' gradients and activations are
        the budget's wherever they sit. So this draw reaches as deep as any and spreads as wide as any: the peak
        planner measures it, so that a plan bounds every later draw and not only the first one."""
        widest = max(c.in_channels for c in self.pool)
        order = (  # lazily: the fill stops once the budget is full, long before pool x widest pairs on a large model
            (layer, channel)
            for channel in range(widest)
            for layer, c in enumerate(self.pool)
            if channel < c.in_channels
        )
        self._assign(fill_in_order(order, self.pool, self.budget, self.capacity))

    def _assign(self, selection: Mapping[str, list[int]]) -> None:
        offset = 0
        for cost in self.pool:
            channels = selection.get(cost.name, [])
            self.layers[cost.name].set_selection(self.adapter_name, torch.tensor(channels, dtype=torch.long), offset)
            offset += len(channels) * cost.weight_per_channel
        for name, layer in self.layers.items():
            if name not in selection:
                layer.set_selection(self.adapter_name, torch.zeros(0, dtype=torch.long), 0)
        if offset > self.flat.numel():  # pragma: no cover - the draws respect the capacity
            raise RuntimeError(f"TraDy selection needs {offset} elements, more than the capacity")

    def _record(self, index: int) -> None:
        self.history.append((index, {n: len(c) for n, c in self.current_selection().items()}))

    def resample(self, index: int, optimizer: Any = None) -> bool:
        """Draw the channels of epoch (or re-sampling step) ``index``.

        Before the new draw the current update is merged into the base weights and the flat parameter is zeroed;
        the optimizer state of the flat parameter (momentum, Adam moments) is reset, since its slices now belong
        to other channels. A draw identical to the current one changes nothing (``static_topk_random``).

        Returns:
            Whether the selection changed.
        """
        check_not_sharded(self.model, action="re-sample (merge updates into the base weights)")
        new = self._draw(index)
        if new == self.current_selection():
            self.index = index
            return False
        with torch.no_grad():
            for layer in self.layers.values():
                layer.merge_current(self.adapter_name)
            self.flat.zero_()
            if self.flat.grad is not None:
                self.flat.grad.zero_()
        self._assign(new)
        if optimizer is not None:
            reset_optimizer_state(optimizer, self.flat)
        self.index = index
        self.last_version = compat.tensor_version(self.flat)
        self._record(index)
        logger.info(
            "TraDy: re-sampled %d channels in %d layers (index %d)", sum(len(c) for c in new.values()), len(new), index
        )
        return True

    # ------------------------------------------------------------------------------------------- what is selected

    def current_selection(self) -> dict[str, list[int]]:
        """``{layer name: selected input channels}`` for the layers with at least one channel selected."""
        return {
            name: layer.selected_channels(self.adapter_name)
            for name, layer in self.layers.items()
            if layer.trady_selected[self.adapter_name].numel()
        }

    def budget_summary(self) -> dict[str, Any]:
        """The cost model's numbers for the current selection (elements, per sample; ``*_bytes``: the same in bytes
        of the flat parameter's dtype)."""
        selection = self.current_selection()
        by_name = {c.name: c for c in self.costs}
        used_weight = sum(len(ch) * by_name[n].weight_per_channel for n, ch in selection.items())
        used_activation = sum(len(ch) * by_name[n].positions for n, ch in selection.items())
        element_size = self.flat.element_size()
        return {
            "budget_elements": self.budget,
            "budget_bytes": self.budget * element_size,
            "used_bytes": (used_weight + used_activation) * element_size,
            "used_elements": used_weight + used_activation,
            "used_weight_elements": used_weight,
            "used_activation_elements_per_sample": used_activation,
            "full_cost_elements": sum(c.full_cost for c in self.costs),
            "capacity": self.capacity,
            "channels": sum(len(ch) for ch in selection.values()),
            "layers_with_channels": len(selection),
            "pool_layers": [c.name for c in self.pool],
            "index": self.index,
        }

    # ------------------------------------------------------------------------------------------- run state

    def export_run_state(self) -> dict[str, Any]:
        """What shapes the rest of a run and is neither in the adapter checkpoint nor derivable from the step: the
        calibration (cost model and layer ranking), the draw index and the optimizer steps counted for
        ``resample_every_steps``. JSON-serialisable. :class:`~hf_collapse.trady.TraDyCallback` saves it with every
        Trainer checkpoint."""
        config = self.config
        return {
            "draw_index": self.index,
            "optimizer_steps": self.steps,
            # [name, value] pairs: the forward order is part of the cost model, and trainer_state.json sorts keys
            "calibration": {
                "layer_positions": [[n, v] for n, v in (config.layer_positions or {}).items()],
                "selected_layers": None if config.selected_layers is None else list(config.selected_layers),
                "layer_rgn": None if config.layer_rgn is None else [[n, v] for n, v in config.layer_rgn.items()],
            },
        }

    @staticmethod
    def restore_calibration(config: TraDyConfig, saved: Mapping[str, Any]) -> None:
        """Put the calibration of :meth:`export_run_state`'s record back into ``config``."""
        calibration = saved["calibration"]
        config.layer_positions = {n: float(v) for n, v in calibration["layer_positions"]}
        config.selected_layers = calibration.get("selected_layers")
        rgn = calibration.get("layer_rgn")
        config.layer_rgn = None if rgn is None else {n: float(v) for n, v in rgn}

    def restore_counters(self, saved: Mapping[str, Any]) -> None:
        """Take the draw index and the optimizer steps of :meth:`export_run_state`'s record."""
        self.index = saved.get("draw_index")
        self.steps = int(saved.get("optimizer_steps") or 0)
        self.last_version = compat.tensor_version(self.flat)

    # ------------------------------------------------------------------------------------------- optimizer steps

    def after_optimizer_step(self, optimizer: Any, driven: bool) -> None:
        """Count an optimizer step that updated the flat parameter (once per update, even when a wrapper and its
        inner optimizer both report it); re-sample every ``resample_every_steps``; warn once when nothing re-samples
        (``driven``: a callback or the user's own loop does)."""
        version = compat.tensor_version(self.flat)
        if version == self.last_version or not optimizer_holds(optimizer, self.flat):
            return
        self.last_version = version
        self.steps += 1
        every = self.config.resample_every_steps
        if every:
            if self.steps % int(every) == 0:
                self.resample(self.steps // int(every), optimizer)
        elif not driven and not self.warned_no_callback:
            self.warned_no_callback = True
            logger.warning(
                "TraDy: nothing re-samples the channels at epoch boundaries, so the first draw trains until "
                "the end. Pass callbacks=[hf_collapse.trady.TraDyCallback()] to the Trainer, set "
                "resample_every_steps, or call model.base_model.resample(epoch, optimizer) at each "
                "epoch of your own loop."
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Steps run inside do not move the run along: the step counter (and the re-sampling it may trigger) is put
        back as it was, and no warning is given."""
        saved = (self.steps, self.last_version, self.warned_no_callback, self.config.resample_every_steps)
        self.warned_no_callback = True
        self.config.resample_every_steps = None
        try:
            yield
        finally:
            self.steps, self.last_version, self.warned_no_callback, self.config.resample_every_steps = saved

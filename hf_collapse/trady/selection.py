"""The cost model, the a priori layer ranking and the channel draws of TraDy.

Cost of input channel ``c`` of a target layer, in elements:

    cost_c = weight-gradient elements of its slice (C_out·kh·kw for a conv, C_out for a linear)
           + activation elements saved for backward per sample (H·W for a conv, tokens for a linear)

The budget is ``budget_elements`` elements, or ``budget_ratio`` of the cost of updating every channel of every target
layer. The reweighted gradient norm ``RGN_c = ‖∂L/∂W_c‖ / cost_c``, accumulated over a few calibration batches,
ranks the layers once (a priori); the top layers that cover ``coverage`` of the cumulative RGN are kept.

Every function here is pure (no model), so the draws are easy to test and identical on every DDP rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LayerCost",
    "budget_elements",
    "candidate_layers",
    "draw_random_channels",
    "draw_top_rgn_channels",
    "fill_in_order",
    "flat_capacity",
    "select_layers_by_rgn",
    "selection_generator",
]


@dataclass(frozen=True)
class LayerCost:
    """The cost model of one target layer.

    Attributes:
        name: module path relative to the base model.
        in_channels: number of input channels (the unit of selection).
        weight_per_channel: weight-gradient elements of one channel's slice.
        positions: activation elements per sample of one channel (tokens, or H·W).

    Example::

        >>> cost = LayerCost("bert.encoder.layer.5.output.dense", in_channels=1536, weight_per_channel=384,
        ...                  positions=128.0)
        >>> cost.channel_cost, cost.full_cost
        (512.0, 786432.0)
    """

    name: str
    in_channels: int
    weight_per_channel: int
    positions: float

    @property
    def channel_cost(self) -> float:
        """Elements to update one input channel: its weight-gradient slice plus its activation per sample."""
        return self.weight_per_channel + self.positions

    @property
    def full_cost(self) -> float:
        """Elements to update every input channel of the layer."""
        return self.in_channels * self.channel_cost


def budget_elements(
    costs: Sequence[LayerCost],
    elements: int | None,
    budget_ratio: float | None,
    default_ratio: float = 0.05,
    budget_bytes: int | None = None,
    bytes_per_element: int = 4,
) -> float:
    """The budget in elements: ``elements``, or ``budget_bytes / bytes_per_element``, or ``budget_ratio`` of the
    cost of every channel of ``costs``.

    Example:
        >>> budget_elements([LayerCost("fc", 10, 4, 6.0)], None, 0.5)
        50.0
        >>> budget_elements([LayerCost("fc", 10, 4, 6.0)], None, None, budget_bytes=200, bytes_per_element=4)
        50.0
    """
    if elements is not None:
        return float(elements)
    if budget_bytes is not None:
        return float(budget_bytes) / int(bytes_per_element)
    ratio = default_ratio if budget_ratio is None else float(budget_ratio)
    return ratio * sum(c.full_cost for c in costs)


def candidate_layers(order: Sequence[str], max_depth: int | None) -> list[str]:
    """The layers allowed by ``max_depth``: the last ``max_depth`` of ``order`` (forward order), or all of them.

    Example::

        >>> candidate_layers(["layer.0.fc", "layer.1.fc", "layer.2.fc"], max_depth=2)
        ['layer.1.fc', 'layer.2.fc']
    """
    order = list(order)
    if max_depth is None or max_depth >= len(order):
        return order
    return order[len(order) - int(max_depth) :]


def select_layers_by_rgn(
    layer_rgn: Mapping[str, float], coverage: float, allowed: Iterable[str] | None = None
) -> list[str]:
    """The fewest layers of highest RGN whose RGN sum reaches ``coverage`` of the total (ties: forward order).

    Returns the kept layers in the order of ``layer_rgn`` (forward order when it comes from calibration).

    Example:
        >>> select_layers_by_rgn({"a": 1.0, "b": 8.0, "c": 1.0}, coverage=0.8)
        ['b']
    """
    allowed_set = set(layer_rgn) if allowed is None else set(allowed)
    items = [(name, float(value)) for name, value in layer_rgn.items() if name in allowed_set]
    if not items:
        return []
    total = sum(max(v, 0.0) for _, v in items)
    if total <= 0 or not math.isfinite(total):
        return [name for name, _ in items]
    ranked = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    kept, covered = set(), 0.0
    for i in ranked:
        kept.add(items[i][0])
        covered += max(items[i][1], 0.0)
        if covered >= coverage * total * (1 - 1e-9):
            break
    return [name for name, _ in items if name in kept]


def selection_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, index)`` (the epoch or re-sampling index): the same on every rank.

    Example::

        >>> torch.randperm(5, generator=selection_generator(seed=0, index=3))
        tensor([3, 2, 0, 1, 4])
    """
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index) * 7_919 + 12_345) % (2**63 - 1))


def flat_capacity(costs: Sequence[LayerCost], budget: float) -> int:
    """Size of the flat delta parameter: enough for what a uniform draw that fills ``budget`` holds.

    The expected weight elements of a uniform draw that fills the budget is ``p·Σ w`` with ``p = budget / Σ cost``;
    the capacity adds 10% and the largest slice, and never exceeds what the budget can hold (a fractional knapsack
    bound) nor every channel of the pool. Draws also respect the capacity, which binds only for strategies that
    favour heavy channels (``det_rgn``).

    Example::

        >>> costs = [LayerCost("fc1", 40, 10, 6.0), LayerCost("fc2", 30, 20, 6.0)]     # full cost 1420 elements
        >>> flat_capacity(costs, budget=142.0), flat_capacity(costs, budget=1420.0)
        (110, 1000)
    """
    total_cost = sum(c.full_cost for c in costs)
    total_weight = sum(c.in_channels * c.weight_per_channel for c in costs)
    if total_cost <= 0:
        return 0
    if budget >= total_cost:
        return int(total_weight)
    expected = budget / total_cost * total_weight
    capacity = math.ceil(1.1 * expected) + max(c.weight_per_channel for c in costs)
    # fractional knapsack: the most weight elements any selection within the budget can hold
    bound, left = 0.0, budget
    for c in sorted(costs, key=lambda c: -c.weight_per_channel / c.channel_cost):
        take = min(c.in_channels, left / c.channel_cost)
        bound += take * c.weight_per_channel
        left -= take * c.channel_cost
        if left <= 0:
            break
    return int(min(capacity, math.ceil(bound), total_weight))


def fill_in_order(
    order: Iterable[tuple[int, int]], costs: Sequence[LayerCost], budget: float, capacity: int
) -> dict[str, list[int]]:
    """Take ``(layer, channel)`` pairs in ``order`` while they fit in the budget and the capacity."""
    chosen: dict[str, list[int]] = {c.name: [] for c in costs}
    cheapest = min(c.channel_cost for c in costs)
    lightest = min(c.weight_per_channel for c in costs)
    left, room = float(budget), int(capacity)
    for layer, channel in order:
        c = costs[layer]
        if c.channel_cost <= left + 1e-9 and c.weight_per_channel <= room:
            chosen[c.name].append(channel)
            left -= c.channel_cost
            room -= c.weight_per_channel
            if left < cheapest - 1e-9 or room < lightest:
                break
    return {name: sorted(channels) for name, channels in chosen.items() if channels}


def draw_random_channels(
    costs: Sequence[LayerCost], budget: float, capacity: int, generator: torch.Generator
) -> dict[str, list[int]]:
    """Channels drawn uniformly at random from the pooled channels of ``costs`` until the budget is full.

    The pooled channels are visited in a random order; a channel is taken when it still fits (so the budget is
    filled as tightly as the channel sizes allow).

    Returns:
        ``{layer name: sorted channel indices}`` for the layers that got at least one channel.

    Example::

        >>> costs = [LayerCost("fc1", 40, 10, 6.0), LayerCost("fc2", 30, 20, 6.0)]
        >>> draw_random_channels(costs, budget=142.0, capacity=110, generator=selection_generator(0, 0))
        {'fc1': [3, 17, 27, 39], 'fc2': [10, 15, 24]}
    """
    if not costs:
        return {}
    sizes = torch.tensor([c.in_channels for c in costs])
    starts = torch.cumsum(sizes, 0) - sizes
    permutation = torch.randperm(int(sizes.sum()), generator=generator)
    layer_of = torch.repeat_interleave(torch.arange(len(costs)), sizes)[permutation]
    channel_of = permutation - starts[layer_of]
    return fill_in_order(list(zip(layer_of.tolist(), channel_of.tolist())), costs, budget, capacity)


def draw_top_rgn_channels(
    costs: Sequence[LayerCost], channel_rgn: Mapping[str, torch.Tensor], budget: float, capacity: int
) -> dict[str, list[int]]:
    """The pooled channels of highest RGN, taken in decreasing order while they fit (the ``det_rgn`` baseline).

    Raises:
        ValueError: when ``channel_rgn`` lacks a layer of ``costs`` (the model was not calibrated).

    Example::

        >>> costs = [LayerCost("a", 4, 2, 1.0), LayerCost("b", 3, 2, 1.0)]
        >>> rgn = {"a": torch.tensor([0.1, 0.9, 0.2, 0.0]), "b": torch.tensor([0.5, 0.3, 0.95])}
        >>> draw_top_rgn_channels(costs, rgn, budget=9.0, capacity=100)
        {'a': [1], 'b': [0, 2]}
    """
    if not costs:
        return {}
    scores, pairs = [], []
    for layer, c in enumerate(costs):
        rgn = channel_rgn.get(c.name)
        if rgn is None:
            raise ValueError(f"no channel RGN for layer {c.name!r}: run hf_collapse.trady.calibrate first")
        scores.append(rgn.detach().float().cpu())
        pairs.extend((layer, ch) for ch in range(c.in_channels))
    order = torch.argsort(torch.cat(scores), descending=True, stable=True).tolist()
    return fill_in_order([pairs[i] for i in order], costs, budget, capacity)

"""TraDy's channel-selection strategies (:data:`SELECTIONS`): TraDy itself, the paper's baselines, and MeDyate-style
importance-weighted sampling.

A strategy is a small object: what it needs (the a priori layer ranking, the calibrated channel RGN), whether it draws
anew at every epoch / re-sampling step, and its ``draw``. The sampler (:class:`~hf_collapse.trady.sampling.
ChannelSampler`), the calibration and the callback read these declarations and never branch on a name; a new strategy
is one subclass and one ``SELECTIONS.register(...)``, then ``TraDyConfig(selection=...)`` and ``hf-collapse trady
--selection`` accept it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..registry import Registry
from .selection import LayerCost, draw_random_channels, draw_top_rgn_channels, fill_in_order, selection_generator

__all__ = ["SELECTIONS", "ChannelSelection"]

#: ``{layer name: channel RGN}`` of the pool, computed on demand (only strategies that use it ask).
ChannelRGN = Callable[[], Mapping[str, torch.Tensor]]


class ChannelSelection:
    """How TraDy chooses the input channels it trains.

    Attributes:
        name: what ``TraDyConfig(selection=...)`` names it by.
        description: a few words for ``--help`` and errors.
        ranks_layers: it draws from the layers the a priori RGN ranking keeps (``selected_layers``); otherwise from
            every target layer.
        needs_channel_rgn: its draws use the calibrated channel RGN (calibration then measures and keeps it).
        refreshes_rgn: the callback re-measures the channel RGN before each epoch's draw (full weight gradients:
            outside the budget, a baseline's privilege).
    """

    name: str = ""
    description: str = ""
    ranks_layers: bool = True
    needs_channel_rgn: bool = False
    refreshes_rgn: bool = False

    def draw(
        self, pool: Sequence[LayerCost], budget: float, capacity: int, seed: int, index: int, rgn: ChannelRGN
    ) -> dict[str, list[int]]:
        """The channels of draw ``index`` (an epoch or a re-sampling step): ``{layer: sorted channels}`` within
        ``budget`` elements and ``capacity`` weight elements, identical on every DDP rank for the same arguments."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Dynamic(ChannelSelection):
    name = "trady"
    description = "channels re-drawn uniformly at random from the RGN-ranked layers at every epoch (TraDy)"

    def draw(self, pool, budget, capacity, seed, index, rgn):
        return draw_random_channels(pool, budget, capacity, selection_generator(seed, index))


class StaticRandom(ChannelSelection):
    name = "static_topk_random"
    description = "the same layers, channels drawn at random once and kept"

    def draw(self, pool, budget, capacity, seed, index, rgn):
        return draw_random_channels(pool, budget, capacity, selection_generator(seed, 0))


class FullRandom(Dynamic):
    name = "full_random"
    description = "channels re-drawn at random from every target layer (no layer ranking)"
    ranks_layers = False


class DeterministicRGN(ChannelSelection):
    name = "det_rgn"
    description = "the channels of highest RGN, re-measured each epoch (outside the budget)"
    needs_channel_rgn = True
    refreshes_rgn = True

    def draw(self, pool, budget, capacity, seed, index, rgn):
        return draw_top_rgn_channels(pool, rgn(), budget, capacity)


class StaticTopRGN(DeterministicRGN):
    """``det_rgn`` without its per-epoch re-measurement: the channels of highest calibrated RGN, chosen once and kept.
    Within the budget (the RGN is the calibration's, measured before training like every RGN-based selection's), so
    it tells how much of ``det_rgn``'s result comes from choosing the top channels rather than from re-measuring."""

    name = "static_top_rgn"
    description = "the channels of highest calibrated RGN, chosen once and kept (det_rgn without re-measurement)"
    refreshes_rgn = False


class ImportanceWeighted(ChannelSelection):
    """MeDyate-style sampling (arXiv 2510.20979): each draw takes channels without replacement with probability
    proportional to their calibrated RGN (importance per element of memory), so important channels come back often
    and the others still get their turn. Weighted sampling without replacement by exponential keys
    (Efraimidis-Spirakis: channel ``c`` sorted by ``log(u_c) / w_c``)."""

    name = "rgn_weighted"
    description = "channels re-drawn at every epoch with probability proportional to their RGN (MeDyate)"
    needs_channel_rgn = True

    def draw(self, pool, budget, capacity, seed, index, rgn):
        if not pool:
            return {}
        scores = rgn()
        weights = torch.cat([scores[c.name].detach().float().cpu().clamp_min(0) for c in pool])
        floor = float(weights.max()) * 1e-6 if float(weights.max()) > 0 else 1.0
        uniform = torch.rand(weights.numel(), generator=selection_generator(seed, index), dtype=torch.float64)
        keys = uniform.clamp_min(1e-300).log() / (weights.double() + floor)
        pairs = [(layer, channel) for layer, c in enumerate(pool) for channel in range(c.in_channels)]
        order = torch.argsort(keys, descending=True, stable=True).tolist()
        return fill_in_order([pairs[i] for i in order], pool, budget, capacity)


class StaticImportanceWeighted(ImportanceWeighted):
    """MeDyate's importance-weighted draw made once and kept: what separates the value of re-sampling from the value of
    drawing by importance."""

    name = "static_rgn_weighted"
    description = "channels drawn once with probability proportional to their RGN, then kept"

    def draw(self, pool, budget, capacity, seed, index, rgn):
        return super().draw(pool, budget, capacity, seed, 0, rgn)


#: TraDy's channel-selection strategies, by name.
SELECTIONS: Registry[ChannelSelection] = Registry(
    "selection", how="add one with hf_collapse.trady.SELECTIONS.register(<a ChannelSelection>)"
)
for _strategy in (
    Dynamic(),
    StaticRandom(),
    FullRandom(),
    DeterministicRGN(),
    StaticTopRGN(),
    ImportanceWeighted(),
    StaticImportanceWeighted(),
):
    SELECTIONS.register(_strategy)

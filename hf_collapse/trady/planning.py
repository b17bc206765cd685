"""A budget on the peak of the whole training step (``TraDyConfig(peak_bytes=...)``): the search for what to train.

The channel budget (``budget_ratio`` / ``budget_bytes``) bounds what the selected channels add to a step: their weight
gradients and saved activations. The step's peak holds more: the frozen model, the optimizer state, and the
activations that every layer between the loss and the lowest selected channel keeps so that the gradient can pass.
A *peak plan* chooses three things so that one step's **measured** peak (:func:`~hf_collapse.profiling.step_memory`:
forward, backward, optimizer step, on the user's batch) stays under the limit:

* the channel budget (elements of weight gradient plus activation per sample, as ``budget_elements``);
* the depth (``max_depth``: only the last target layers may be selected, so backpropagation stops there);
* gradient checkpointing (activations recomputed in backward instead of kept).

Each candidate plan is measured on its heaviest draw (``ChannelSampler.assign_deepest``: channels one per layer from
the lowest layer of the pool up), not on whichever draw comes first: with few channels in a pool spanning several
blocks, a later draw that lands in the lowest layer makes the backward pass run
through every block above it, and only the heaviest draw bounds them all.

The search (:func:`plan_for_peak`) measures candidate plans through a callable, so it is independent of the model:
for each checkpointing setting (off first, then on where the model supports it), the deepest pool whose smallest
plan (one channel) fits, then the largest channel budget that fits there (a geometric bisection, up to a cap: the
user's own channel budget when given, every channel otherwise). The plan with the most channels wins; on a tie, the
deeper pool and then no checkpointing (faster). When even one channel of the last layer with checkpointing does not
fit, the limit cannot be met: :class:`PeakBudgetError` says the smallest peak measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PeakBudgetError", "PeakPlan", "Trial", "depth_choices", "depth_text", "plan_for_peak"]

#: The share of the limit a plan may fill: the draws of later epochs select other channels, whose step peaks differ a
#: little from the measured (heaviest) draw's.
DEFAULT_MARGIN = 0.03


class PeakBudgetError(ValueError):
    """``peak_bytes`` is below the smallest step peak TraDy can reach on this model and batch."""


@dataclass
class Trial:
    """One measured candidate plan."""

    budget_elements: float
    max_depth: int | None
    gradient_checkpointing: bool
    peak_bytes: int


@dataclass
class PeakPlan:
    """What a peak budget bought, and what was measured.

    Attributes:
        peak_bytes: the limit (``TraDyConfig.peak_bytes``).
        budget_elements: the channel budget chosen (elements, as ``TraDyConfig.budget_elements``).
        max_depth: only the last ``max_depth`` target layers may be selected (``None``: the ranked layers, any depth).
        gradient_checkpointing: whether the plan turns gradient checkpointing on.
        measured_peak_bytes: the measured peak of one training step under the plan.
        cap_elements: the most channel budget the plan could have taken (the user's channel budget, or every channel).
        trials: every plan measured on the way.
    """

    peak_bytes: int
    budget_elements: float
    max_depth: int | None
    gradient_checkpointing: bool
    measured_peak_bytes: int
    cap_elements: float
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeakPlan:
        values = dict(data)
        values["trials"] = [Trial(**t) for t in values.get("trials", [])]
        return cls(**values)

    def describe(self) -> str:
        """One sentence: the limit, what it bought and the measured peak.

        Example:
            >>> PeakPlan(2**30, 5e5, None, True, 1000 * 2**20, 1e6).describe()[:61]
            'peak budget 1,024.0 MiB: a channel budget of 500,000 elements'
        """
        depth = depth_text(self.max_depth)
        share = self.budget_elements / self.cap_elements if self.cap_elements else 0.0
        return (
            f"peak budget {self.peak_bytes / 2**20:,.1f} MiB: a channel budget of {self.budget_elements:,.0f} elements "
            f"({share:.3g} of {self.cap_elements:,.0f}), {depth}, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}; "
            f"measured peak {self.measured_peak_bytes / 2**20:,.1f} MiB"
        )


def depth_text(depth: int | None) -> str:
    """A plan's depth in words.

    Example:
        >>> depth_text(None), depth_text(1), depth_text(4)
        ('any depth', 'the last target layer', 'the last 4 target layers')
    """
    if depth is None:
        return "any depth"
    return "the last target layer" if depth == 1 else f"the last {depth} target layers"


def depth_choices(num_layers: int) -> list[int | None]:
    """The depths tried, deepest first: any depth, then the last half, quarter, ... of the target layers, down to one.

    Example:
        >>> depth_choices(10)
        [None, 5, 2, 1]
    """
    depths: list[int | None] = [None]
    depth = num_layers // 2
    while depth >= 1:
        depths.append(depth)
        depth //= 2
    if depths[-1] != 1:
        depths.append(1)
    return depths


def _preference(trial: Trial) -> tuple[float, float, bool]:
    """More channels first (budgets within 0.1% are equal), then a deeper pool, then no checkpointing."""
    return (
        round(math.log(trial.budget_elements) * 1000) if trial.budget_elements > 0 else -math.inf,
        math.inf if trial.max_depth is None else trial.max_depth,
        not trial.gradient_checkpointing,
    )


def plan_for_peak(
    limit: int,
    measure: Callable[[float, int | None, bool], int],
    *,
    min_elements: float,
    cap_elements: float,
    depths: Sequence[int | None],
    depth_cost: Callable[[int | None], float] | None = None,
    checkpointing: Sequence[bool] = (False, True),
    margin: float = DEFAULT_MARGIN,
    bisections: int = 6,
) -> PeakPlan:
    """Search the plan with the largest channel budget whose measured step peak stays under ``limit``.

    Args:
        limit: the peak budget in bytes.
        measure: ``measure(budget_elements, max_depth, gradient_checkpointing) -> peak bytes`` of one training step.
        min_elements: the smallest channel budget (one channel of any target layer).
        cap_elements: the largest channel budget to consider.
        depths: the depths to try, deepest first (:func:`depth_choices`).
        depth_cost: the cost of every channel a depth allows (a channel budget above it buys nothing more there).
        checkpointing: the checkpointing settings to try, in order of preference.
        margin: a plan fits when its measured peak is at most ``(1 - margin) * limit``.
        bisections: geometric bisection steps of the channel budget.

    Raises:
        PeakBudgetError: when no plan fits, with the smallest peak measured.

    Example:
        >>> peak = lambda budget, depth, ckpt: int(100 + budget * (0.5 if ckpt else 1.0) + (depth or 8) * 10)
        >>> plan = plan_for_peak(300, peak, min_elements=1, cap_elements=1000, depths=[None, 4, 2, 1])
        >>> plan.gradient_checkpointing, plan.max_depth, plan.budget_elements > 100, plan.measured_peak_bytes <= 291
        (True, None, True, True)
    """
    if cap_elements < min_elements:
        cap_elements = min_elements
    fits_under = (1.0 - margin) * limit
    trials: list[Trial] = []

    def run(budget: float, depth: int | None, ckpt: bool) -> int:
        peak = int(measure(budget, depth, ckpt))
        trials.append(Trial(budget, depth, ckpt, peak))
        return peak

    best: Trial | None = None
    for ckpt in checkpointing:
        for depth in depths:
            peak = run(min_elements, depth, ckpt)
            if peak > fits_under:
                continue  # even one channel this deep does not fit: a shallower pool
            low, low_peak = min_elements, peak
            cap = cap_elements if depth_cost is None else max(min_elements, min(cap_elements, depth_cost(depth)))
            if cap > min_elements:
                peak = run(cap, depth, ckpt)
                if peak <= fits_under:
                    low, low_peak = cap, peak
                else:
                    high = cap
                    for _ in range(bisections):
                        middle = math.sqrt(low * high)
                        peak = run(middle, depth, ckpt)
                        if peak <= fits_under:
                            low, low_peak = middle, peak
                        else:
                            high = middle
            candidate = Trial(low, depth, ckpt, low_peak)
            if best is None or _preference(candidate) > _preference(best):
                best = candidate
            break  # the deepest pool that fits, for this checkpointing setting
        if best is not None and best.budget_elements >= cap_elements and best.max_depth is None:
            break  # everything asked for fits without the next setting
    if best is None:
        smallest = min(trials, key=lambda t: t.peak_bytes)
        least = math.ceil(smallest.peak_bytes / (1.0 - margin))
        setting = f"one channel, {depth_text(smallest.max_depth)}, gradient checkpointing " + (
            "on" if smallest.gradient_checkpointing else "off"
        )
        raise PeakBudgetError(
            f"peak_bytes={limit:,} ({limit / 2**20:,.1f} MiB) cannot be met: the smallest training step TraDy "
            f"reaches on this model and batch measures {smallest.peak_bytes:,} bytes "
            f"({smallest.peak_bytes / 2**20:,.1f} MiB: {setting}; the frozen parameters, the logits and the loss are "
            f"in every plan). Raise peak_bytes to at least {least:,}, or train on a smaller batch or shorter sequences."
        )
    return PeakPlan(
        peak_bytes=int(limit),
        budget_elements=float(best.budget_elements),
        max_depth=best.max_depth,
        gradient_checkpointing=best.gradient_checkpointing,
        measured_peak_bytes=int(best.peak_bytes),
        cap_elements=float(cap_elements),
        trials=trials,
    )

"""How far a collapse may go: :class:`Budget`, the one budget vocabulary of hf_collapse.

Every search (block removal, sub-layer removal, TLC's linearization, LaCoOT's collapse, ``hf-collapse prune``) stops
at the first limit it reaches:

* ``num_units``: at most this many units (blocks, sub-layers or activation layers);
* ``max_metric_delta``: while the metric stays within this of the original model's, in the metric's bad direction
  (an accuracy drop of at most 0.02; a perplexity rise of at most 5);
* ``max_metric_ratio``: while the metric stays within this factor (>= 1) of the original's (perplexity at most 1.25x;
  accuracy at least the original's / 1.25).
* ``flops_fraction``: until the model's forward FLOPs are at most this fraction (0 < f < 1) of the original's (0.8:
  a fifth fewer), counted after every step; the step that gets there is kept. The budget to give when units differ in
  size (BlockPruner's attention and MLP sub-layers, ``per_flop=True``): a count of units says nothing of the saving.

The spellings of earlier versions (``num_blocks``, ``target_layers``, ``max_metric_drop``, ``max_metric_increase``)
are accepted by :meth:`Budget.from_arguments` with a ``FutureWarning``, for one release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .deprecation import renamed

__all__ = ["BUDGET_FIELDS", "DEPRECATED_BUDGET_NAMES", "Budget", "BudgetArguments", "check_limits"]

#: The limits a budget may set.
BUDGET_FIELDS = ("num_units", "max_metric_delta", "max_metric_ratio", "flops_fraction")

#: Earlier spellings of the budget's fields, and the field each now is.
DEPRECATED_BUDGET_NAMES = {
    "num_blocks": "num_units",
    "target_layers": "num_units",
    "max_metric_drop": "max_metric_delta",
    "max_metric_increase": "max_metric_delta",
}


def check_limits(
    num_units: int | None = None,
    max_metric_delta: float | None = None,
    max_metric_ratio: float | None = None,
    flops_fraction: float | None = None,
) -> None:
    """Refuse a limit out of its range (each one given; none at all is :class:`Budget`'s to refuse)."""
    if num_units is not None and (isinstance(num_units, bool) or int(num_units) != num_units or num_units < 1):
        raise ValueError(f"num_units must be an integer >= 1, got {num_units!r}")
    if max_metric_delta is not None and not max_metric_delta >= 0:
        raise ValueError(f"max_metric_delta must be >= 0 (how much worse the metric may get), got {max_metric_delta}")
    if max_metric_ratio is not None and not max_metric_ratio >= 1:
        raise ValueError(
            f"max_metric_ratio must be >= 1 (the metric may get this many times worse), got {max_metric_ratio}"
        )
    if flops_fraction is not None and not 0 < flops_fraction < 1:
        raise ValueError(
            f"flops_fraction must be between 0 and 1 (the share of the original's FLOPs to reach), got {flops_fraction}"
        )


@dataclass
class BudgetArguments:
    """The budget as arguments: the fields of every job's flags (``hf-collapse lacoot | tlc | prune``) and of
    :class:`~hf_collapse.tlc.TLCConfig`, declared once; :class:`Budget` checks them (each as it is given, then
    :meth:`budget` that there is one).

    Example::

        >>> from hf_collapse.budget import BudgetArguments
        >>> BudgetArguments(num_units=2, max_metric_ratio=1.25).budget(higher_is_better=False).to_dict()
        {'num_units': 2, 'max_metric_ratio': 1.25}
    """

    num_units: int | None = field(default=None, metadata={"help": "Remove (collapse) at most this many units."})
    max_metric_delta: float | None = field(
        default=None,
        metadata={
            "help": "The metric may get this much worse than the original's (an accuracy drop, a perplexity rise)."
        },
    )
    max_metric_ratio: float | None = field(
        default=None, metadata={"help": "The metric may get this many times worse than the original's (>= 1)."}
    )
    flops_fraction: float | None = field(
        default=None,
        metadata={"help": "Remove until the forward FLOPs are at most this fraction of the original's (e.g. 0.8)."},
    )

    def __post_init__(self):
        check_limits(**self.limits())

    def limits(self) -> dict[str, Any]:
        """``{field: value}`` of the four limits (``None`` where not given)."""
        return {name: getattr(self, name) for name in BUDGET_FIELDS}

    def has_budget(self) -> bool:
        return any(value is not None for value in self.limits().values())

    def budget(self, higher_is_better: bool = True) -> Budget:
        """The :class:`Budget` these arguments give (``ValueError`` when they give none)."""
        return Budget(higher_is_better=higher_is_better, **self.limits())


@dataclass(frozen=True)
class Budget:
    """The limits of one collapse (see the module docstring); at least one must be set.

    Attributes:
        num_units: remove (collapse) at most this many units.
        max_metric_delta: how much worse the metric may get than the original model's, in absolute terms.
        max_metric_ratio: how many times worse (>= 1).
        flops_fraction: stop once the forward FLOPs are at most this fraction of the original's (0 < f < 1).
        higher_is_better: the metric's direction (``False`` for a loss or a perplexity).

    Example::

        >>> from hf_collapse.budget import Budget
        >>> budget = Budget(num_units=4, max_metric_ratio=1.25, higher_is_better=False)   # perplexity
        >>> budget.allows(baseline=20.0, metric=24.0), budget.allows(baseline=20.0, metric=26.0)
        (True, False)
    """

    num_units: int | None = None
    max_metric_delta: float | None = None
    max_metric_ratio: float | None = None
    flops_fraction: float | None = None
    higher_is_better: bool = True

    def __post_init__(self):
        check_limits(
            num_units=self.num_units,
            max_metric_delta=self.max_metric_delta,
            max_metric_ratio=self.max_metric_ratio,
            flops_fraction=self.flops_fraction,
        )
        if self.num_units is None and self.flops_fraction is None and not self.needs_metric:
            raise ValueError(
                "no budget: give num_units, flops_fraction, a metric budget (max_metric_delta / max_metric_ratio, "
                "with an evaluation), or several"
            )

    @classmethod
    def from_arguments(cls, *, where: str, higher_is_better: bool = True, **arguments: Any) -> Budget:
        """A budget from keyword arguments in the current or a deprecated spelling (``num_blocks``,
        ``target_layers``, ``max_metric_drop``, ``max_metric_increase``: a ``FutureWarning`` each). ``where`` names
        the API for the messages.

        Raises:
            ValueError: for two spellings of one field given different values, ``max_metric_increase`` for a metric
                where higher is better, an unknown name, or no limit at all.
        """
        values: dict[str, Any] = {}
        for name, value in arguments.items():
            if value is None:
                continue
            field = DEPRECATED_BUDGET_NAMES.get(name, name)
            if field not in BUDGET_FIELDS:
                raise TypeError(f"{where}: unknown budget argument {name!r}")
            if name != field:
                renamed(name, field, where, stacklevel=4)
                if name == "max_metric_increase" and higher_is_better:
                    raise ValueError(
                        "max_metric_increase is the budget of a metric where lower is better: pass "
                        "higher_is_better=False (or use max_metric_delta)"
                    )
            if field in values and values[field] != value:
                raise ValueError(
                    f"{where}: {field} is given twice with different values ({values[field]!r} and "
                    f"{value!r}, as {name!r})"
                )
            values[field] = value
        return cls(higher_is_better=higher_is_better, **values)

    @property
    def needs_metric(self) -> bool:
        """Whether the budget limits the metric (a search then needs an evaluation)."""
        return self.max_metric_delta is not None or self.max_metric_ratio is not None

    def units_to_try(self, available: int) -> int:
        """How many units a search may remove, out of ``available`` candidates."""
        return available if self.num_units is None else min(int(self.num_units), available)

    def flops_reached(self, original_flops: int | None, flops: int | None) -> bool:
        """Whether a model of ``flops`` forward FLOPs has reached ``flops_fraction`` of the original's (``False``
        without that limit or a count)."""
        if self.flops_fraction is None or not original_flops or flops is None:
            return False
        return flops <= self.flops_fraction * original_flops

    def allows(self, baseline: float | None, metric: float | None) -> bool:
        """Whether a model whose metric is ``metric`` stays within the budget, the original's being ``baseline``."""
        if not self.needs_metric:
            return True
        if metric is None or baseline is None:
            raise ValueError("a metric budget needs the metric of every state: pass an evaluation function")
        worse_by = baseline - metric if self.higher_is_better else metric - baseline
        if self.max_metric_delta is not None and not worse_by <= self.max_metric_delta:
            return False
        if self.max_metric_ratio is not None:
            within = (
                metric * self.max_metric_ratio >= baseline
                if self.higher_is_better
                else metric <= self.max_metric_ratio * baseline
            )
            if not within:
                return False
        return True

    def metric_limits(self, baseline: float | None) -> list[tuple[float, str]]:
        """The metric values the budget allows, with a legend label each (for the trade-off plot)."""
        if baseline is None:
            return []
        limits = []
        if self.max_metric_delta is not None:
            sign = "-" if self.higher_is_better else "+"
            limit = baseline - self.max_metric_delta if self.higher_is_better else baseline + self.max_metric_delta
            limits.append((limit, f"budget ({sign}{self.max_metric_delta:g})"))
        if self.max_metric_ratio is not None:
            limit = baseline / self.max_metric_ratio if self.higher_is_better else baseline * self.max_metric_ratio
            limits.append((limit, f"budget (x{self.max_metric_ratio:g})"))
        return limits

    def to_dict(self) -> dict[str, Any]:
        """The limits that are set, as a report and a model card show them."""
        return {name: getattr(self, name) for name in BUDGET_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], higher_is_better: bool = True) -> Budget | None:
        """The budget a report recorded (``to_dict``, or the keys of earlier versions); ``None`` when it holds none."""
        values = {}
        for name, value in (data or {}).items():
            field = DEPRECATED_BUDGET_NAMES.get(name, name)
            if value is not None and field in BUDGET_FIELDS:
                values[field] = value
        return cls(higher_is_better=higher_is_better, **values) if values else None

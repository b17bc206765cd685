"""What a search is (:class:`Search`), the registry of searches (:data:`SEARCHES`) and :func:`find_search`.

A search decides which units :func:`hf_collapse.prune` removes. It declares what it removes (whole blocks or
sub-layers: whether a whole-block healing applies), whether it chooses its own units, whether its batches need labels
and which options it takes, refuses up front what it cannot do (:meth:`Search.check`), and builds the
:class:`~hf_collapse.engine.SearchStrategy` the one budgeted loop runs (:meth:`Search.strategy`). Every scorer of
:data:`hf_collapse.scoring.SCORERS` is a search too, one shot (:class:`~hf_collapse.searches.one_shot.OneShotSearch`):
:func:`find_search` gives either. A new search is one file with one :class:`Search` subclass and one registration:
``SEARCHES.register(MySearch())``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..engine import Budget, SearchStrategy
from ..registry import Registry

__all__ = ["SEARCHES", "Search"]


class Search:
    """A way to choose the units to remove, step by step under a budget.

    Attributes:
        name: what ``method=`` (and ``hf-collapse prune --method``) names it by.
        description: a few words for ``--help`` and errors.
        removes: ``"blocks"`` or ``"sub-layers"`` (attention / MLP): a healing that replaces whole blocks applies
            only to the former.
        chooses_units: whether it picks its own units (``granularity`` must then stay ``"block"``).
        needs_labels: whether its calibration batches must carry labels.
        options: the options of :func:`hf_collapse.prune` it takes besides the budget (e.g. ``"per_flop"``).
    """

    name: str = ""
    description: str = ""
    removes: str = "blocks"
    chooses_units: bool = True
    needs_labels: bool = True
    options: tuple[str, ...] = ()

    def removes_sublayers(self, granularity: str = "block") -> bool:
        """Whether what it removes, at ``granularity``, are sub-layers rather than whole blocks."""
        return self.removes == "sub-layers" or granularity != "block"

    def check(self, budget: Budget, granularity: str = "block", options: Mapping[str, Any] | None = None) -> None:
        """Refuse, before any work, a request this search cannot honour (``ValueError`` saying why)."""
        if self.chooses_units and granularity != "block":
            raise ValueError(f"method {self.name!r} chooses its own units: leave granularity='block'")
        for option, value in (options or {}).items():
            if value and option not in self.options:
                takes = [s.name for s in SEARCHES.entries() if option in s.options]
                raise ValueError(
                    f"{option} is an option of method {' or '.join(repr(t) for t in takes) or 'none'}, "
                    f"not of {self.name!r}"
                )

    def strategy(
        self,
        model: nn.Module,
        batches: Sequence[Mapping[str, Any]],
        budget: Budget,
        *,
        granularity: str = "block",
        inputs: Mapping[str, Any],
        resume_from: Any = None,
        progress: bool = True,
        **options: Any,
    ) -> tuple[SearchStrategy, dict[str, Any]]:
        """The strategy the engine runs on ``model`` and what else a resumed run must share with this one (e.g.
        ``{"data": digest}``); ``inputs`` are the example inputs FLOPs are counted on."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


#: The searches of :func:`hf_collapse.prune` besides the one-shot scorers (which :func:`find_search` also gives).
SEARCHES: Registry[Search] = Registry("search", how="add one with hf_collapse.searches.SEARCHES.register(<a Search>)")

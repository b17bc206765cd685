"""The searches of :func:`hf_collapse.prune`: which units to remove, step by step under a budget.

Every search is an entry of one registry, :data:`SEARCHES` (:class:`Search`); every scorer of
:data:`hf_collapse.scoring.SCORERS` is a one-shot search too. :func:`find_search` gives either by name. Built in:

* :mod:`~hf_collapse.searches.one_shot`: :class:`RemovalStrategy` (units scored once, removed lowest first: the
  strategy of :func:`hf_collapse.collapse`) and :class:`OneShotSearch` (a scorer as a search);
* :mod:`~hf_collapse.searches.iterative`: ``"sleb"`` and ``"blockpruner"`` (re-scored by loss after each removal);
* :mod:`~hf_collapse.searches.span`: ``"span"`` (PruneMe's closest contiguous span).
"""

from ..scoring import SCORERS
from .base import SEARCHES, Search
from .iterative import BlockPruner, IterativeLossStrategy, Sleb
from .one_shot import OneShotSearch, RemovalStrategy
from .span import Span, SpanStrategy

for _builtin in (Sleb(), BlockPruner(), Span()):
    SEARCHES.register(_builtin)

__all__ = [
    "SEARCHES",
    "BlockPruner",
    "IterativeLossStrategy",
    "OneShotSearch",
    "RemovalStrategy",
    "Search",
    "Sleb",
    "Span",
    "SpanStrategy",
    "find_search",
    "method_names",
]


def find_search(method: str) -> Search:
    """The search ``method`` names: a registered search, or a registered scorer as a one-shot search.

    Raises:
        ValueError: for a name that is neither, listing both kinds.
    """
    if method in SEARCHES:
        return SEARCHES.get(method)
    if method in SCORERS:
        return OneShotSearch(SCORERS.get(method))
    raise ValueError(
        f"unknown pruning method {method!r}; accepted: {', '.join(method_names())} (one-shot scorers: "
        f"{', '.join(SCORERS)}; searches: {', '.join(SEARCHES)})"
    )


def method_names() -> list[str]:
    """Every name :func:`find_search` accepts: the scorers, then the searches."""
    return [*SCORERS, *SEARCHES]

"""The one budgeted-collapse engine: a :class:`Budget`, a :class:`SearchStrategy` that proposes recorded edits, and
the resumable loop that applies, evaluates, keeps or undoes, measures and reports them (:func:`run_search`)."""

from ..budget import Budget
from .progress import ProgressFolder
from .search import Candidate, SearchStrategy, run_search

__all__ = ["Budget", "Candidate", "ProgressFolder", "SearchStrategy", "run_search"]

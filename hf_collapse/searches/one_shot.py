"""One-shot removal: every unit scored once, removed lowest score first (:class:`RemovalStrategy`, the strategy of
:func:`hf_collapse.collapse`), and :class:`OneShotSearch`, any registered scorer as a search of
:func:`hf_collapse.prune`."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..architectures.base import Block
from ..engine import Candidate, ProgressFolder, SearchStrategy
from ..engine.progress import batches_digest, json_safe
from ..metrics import module_flops
from ..names import resolve_names
from ..scoring import Scorer, score_blocks
from ..surgery import block_aliases, find_blocks, remove_blocks
from .base import Search

__all__ = ["OneShotSearch", "RemovalStrategy"]


class RemovalStrategy(SearchStrategy):
    """Remove the scored units one at a time, lowest score first (ties: forward order), never the last one.

    ``scores`` may name units in any accepted spelling (:func:`hf_collapse.find_blocks`); only scored units are
    candidates. FLOPs are counted once, on the original model: a removed unit takes exactly its own FLOPs away.
    """

    def __init__(self, model: nn.Module, scores: Mapping[str, float], granularity: str = "block"):
        if not scores:
            raise ValueError("no scores given: the budget selects nothing (use hf_collapse.score_blocks to get scores)")
        units = find_blocks(model, granularity)
        self.granularity = granularity
        self.unit_name = "blocks" if granularity == "block" else "sub-layers"
        self.scores = _canonical_scores(units, scores)
        position = {unit.name: i for i, unit in enumerate(units)}
        self.order = sorted(self.scores, key=lambda name: (self.scores[name], position[name]))
        self._units = {unit.name: unit for unit in units}
        self.alive = [unit.name for unit in units]  # original names of the units still in the model, in order
        self.next = 0  # position in `order` of the next candidate
        self.flops: int | None = None
        self.unit_flops: dict[str, int] = {}
        self.scoring: dict[str, Any] = {}  # what scoring cost, when the scores were measured for this search

    def count_flops(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """Count the FLOPs of the original model and of each candidate unit, once."""
        paths = {name: (self._units[name].path, *self._units[name].extra_paths) for name in self.order}
        total, per_path = module_flops(model, inputs, [p for unit_paths in paths.values() for p in unit_paths])
        self.flops = total
        self.unit_flops = {name: sum(per_path[p] for p in unit_paths) for name, unit_paths in paths.items()}

    def available(self) -> int:
        # Never the last unit of the model: a model needs at least one block.
        return min(len(self.order) - self.next, len(self.alive) - 1)

    def least_flops(self) -> int | None:
        if self.flops is None:
            return None
        return self.flops - sum(self.unit_flops[name] for name in self.order[self.next : self.next + self.available()])

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        if self.available() < 1:
            return None
        name = self.order[self.next]
        current = find_blocks(model, self.granularity)[self.alive.index(name)].name  # units are renumbered
        flops = None if self.flops is None else self.flops - self.unit_flops[name]
        return Candidate(
            units=[name], score=self.scores[name], flops=flops, apply=lambda m: remove_blocks(m, [current])
        )

    def accept(self, candidate: Candidate) -> None:
        name = candidate.units[0]
        self.alive.remove(name)
        self.next += 1
        if self.flops is not None:
            self.flops -= self.unit_flops[name]

    def state(self) -> dict[str, Any]:
        return {"alive": list(self.alive), "next": self.next, "flops": self.flops}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.alive, self.next, self.flops = list(state["alive"]), int(state["next"]), state["flops"]

    def fingerprint(self) -> dict[str, Any]:
        return {"strategy": "removal", "granularity": self.granularity, "scores": self.scores}

    def report_scores(self) -> dict[str, float]:
        return dict(self.scores)

    def cost(self) -> dict[str, Any]:
        return dict(self.scoring)


def _canonical_scores(units: list[Block], scores: Mapping[str, float]) -> dict[str, float]:
    """``scores`` keyed by the units' names (any accepted spelling may be given)."""
    scored = resolve_names(
        list(scores),
        {u.name: u for u in units},
        "block",
        aliases=block_aliases(units),
        where="this model (scores name them)",
    )
    fixed = [u.name for u in scored if not u.removable]
    if fixed:
        raise ValueError(f"scores name blocks that are not removable: {fixed} ({scored[0].reason})")
    return {u.name: float(value) for u, value in zip(scored, scores.values())}


class OneShotSearch(Search):
    """A scorer as a search: every unit scored once on the calibration batches, then removed lowest first."""

    chooses_units = False

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.name = scorer.name
        self.description = f"one shot: {scorer.description}" if scorer.description else "one shot"
        self.needs_labels = scorer.needs_labels

    def removes_sublayers(self, granularity: str = "block") -> bool:
        return granularity != "block"

    def strategy(
        self, model, batches, budget, *, granularity="block", inputs, resume_from=None, progress=True, **options
    ):
        data = {"data": batches_digest(batches), "scorer": json_safe({"method": self.name, **options})}
        start = time.perf_counter()
        # a resumed run scored on the same data takes its scores from its folder, and does not score again
        scores = _saved_scores(resume_from, data) if resume_from is not None else None
        if scores is None:
            scores = score_blocks(
                model, batches, method=self.name, granularity=granularity, progress=progress, **options
            )
        strategy = RemovalStrategy(model, scores, granularity)
        strategy.count_flops(model, inputs)
        strategy.scoring = {
            "scoring_seconds": round(time.perf_counter() - start, 2),
            "forward_passes": self.scorer.forward_passes(len(scores), len(batches)),
        }
        return strategy, data


def _saved_scores(folder: str | os.PathLike, data: Mapping[str, Any]) -> dict[str, float] | None:
    """The scores a one-shot run saved in its progress folder, when it scored the same data with the same scorer
    (else ``None``: score again, and the resume's own checks say what differs)."""
    saved = ProgressFolder(folder).read()["fingerprint"]
    if any(saved.get(key) != value for key, value in json_safe(dict(data)).items()):
        return None
    scores = (saved.get("search") or {}).get("scores")
    return dict(scores) if isinstance(scores, dict) else None

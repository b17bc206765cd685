"""Budgeted removal of blocks (or sub-layers) in ascending score order: :func:`collapse`, a search of the engine.

(The module is ``removal`` so that ``hf_collapse.collapse`` always names the function.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .architectures.base import Block, adapter_for
from .engine import Budget, Candidate, SearchStrategy, run_search
from .metrics import module_flops
from .names import resolve_names
from .report import CollapseReport
from .surgery import block_aliases, find_blocks, remove_blocks

__all__ = ["RemovalStrategy", "collapse"]


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

    def count_flops(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """Count the FLOPs of the original model and of each candidate unit, once."""
        paths = {name: (self._units[name].path, *self._units[name].extra_paths) for name in self.order}
        total, per_path = module_flops(model, inputs, [p for unit_paths in paths.values() for p in unit_paths])
        self.flops = total
        self.unit_flops = {name: sum(per_path[p] for p in unit_paths) for name, unit_paths in paths.items()}

    def available(self) -> int:
        # Never the last unit of the model: a model needs at least one block.
        return min(len(self.order) - self.next, len(self.alive) - 1)

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


def collapse(
    model: nn.Module,
    scores: Mapping[str, float],
    num_units: int | None = None,
    max_metric_delta: float | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    finetune: Callable[[nn.Module], nn.Module | None] | None = None,
    *,
    higher_is_better: bool = True,
    max_metric_ratio: float | None = None,
    metric_name: str | None = None,
    example_inputs: Mapping[str, Any] | None = None,
    latency_repeats: int = 5,
    method: str = "collapse",
    progress: bool = True,
    granularity: str = "block",
    progress_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    num_blocks: int | None = None,
    max_metric_drop: float | None = None,
    max_metric_increase: float | None = None,
) -> tuple[nn.Module, CollapseReport]:
    """Remove blocks in ascending score order under a budget, measuring the model at every step.

    Args:
        model: the model to collapse; it is not modified.
        scores: ``{block name: score}`` (from :func:`hf_collapse.score_blocks` or ``LaCoOTTrainer.block_scores``);
            only these blocks are candidates, lowest score first.
        num_units: remove (at most) this many blocks.
        max_metric_delta: remove greedily while ``eval_fn`` stays within this of the uncollapsed model's metric, in
            the metric's bad direction (an accuracy drop; with ``higher_is_better=False``, a loss or perplexity rise);
            the step that would exceed it is not kept and the collapse stops there.
        eval_fn: ``model -> metric``, evaluated before and after each removal (required by a metric budget).
        finetune: ``model -> model`` run after each removal, before evaluation (e.g. a short healing fine-tune).
        higher_is_better: the metric's direction (``False`` for a loss or a perplexity).
        max_metric_ratio: remove while the metric stays within this factor (>= 1) of the uncollapsed model's:
            ``metric <= ratio * before`` when lower is better (a perplexity budget), ``metric >= before / ratio``
            when higher is better.
        metric_name: the metric's name in the report.
        example_inputs: inputs for FLOPs and latency (default: the adapter's example inputs at batch size 1).
        latency_repeats: interleaved rounds of each latency measurement, each state timed side by side with the
            uncollapsed model (0 to skip latency).
        method: the method name recorded in the report.
        progress: show a progress bar (on the main process only under DDP).
        granularity: the units ``scores`` name: ``"block"``, or for decoders ``"attention"`` / ``"mlp"`` sub-layers
            (as scored by ``score_blocks(..., granularity=...)``).
        progress_dir: write the run's progress there after every removal, so that an interrupted run continues with
            ``resume_from`` (:mod:`hf_collapse.engine.progress`).
        resume_from: the progress folder of an interrupted run of the same model, scores and budget.
        num_blocks, max_metric_drop, max_metric_increase: the names of ``num_units`` and ``max_metric_delta`` in
            earlier versions (deprecated: a ``FutureWarning``).

    Returns:
        ``(collapsed_model, report)``: a new model, and the :class:`CollapseReport` of every step.

    Example::

        >>> scores = hf_collapse.score_blocks(model, loader, method="msw")
        >>> smaller, report = hf_collapse.collapse(model, scores, max_metric_delta=0.01, eval_fn=accuracy)
        >>> report.save("outputs/collapse")
    """
    strategy = RemovalStrategy(model, scores, granularity)
    budget = Budget.from_arguments(
        where="hf_collapse.collapse",
        higher_is_better=higher_is_better,
        num_units=num_units,
        max_metric_delta=max_metric_delta,
        max_metric_ratio=max_metric_ratio,
        num_blocks=num_blocks,
        max_metric_drop=max_metric_drop,
        max_metric_increase=max_metric_increase,
    )
    if budget.num_units is not None and budget.num_units > len(strategy.order):
        raise ValueError(
            f"num_units must be between 1 and the {len(strategy.order)} scored blocks, got {budget.num_units}"
        )
    if budget.needs_metric and eval_fn is None:
        raise ValueError(
            "a metric budget (max_metric_delta / max_metric_ratio) needs eval_fn, the function that "
            "evaluates the metric of a model"
        )
    inputs = example_inputs if example_inputs is not None else adapter_for(model).example_inputs(model, batch_size=1)
    strategy.count_flops(model, inputs)
    return run_search(
        model,
        strategy,
        budget,
        method=method,
        evaluate=eval_fn,
        finetune=finetune,
        metric_name=metric_name,
        inputs=inputs,
        latency_repeats=latency_repeats,
        progress_dir=progress_dir,
        resume_from=resume_from,
        show_progress=progress,
    )

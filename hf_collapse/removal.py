"""Budgeted removal of blocks (or sub-layers), searches of the collapse engine: :func:`collapse` (units scored
once, lowest first) and :func:`prune` (the field's depth-pruning methods in one API: any registered scorer one shot,
or a registered search: SLEB, BlockPruner, PruneMe spans; see :mod:`hf_collapse.searches`).

(The module is ``removal`` so that ``hf_collapse.collapse`` always names the function.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .architectures.base import adapter_for
from .engine import Budget, run_search
from .report import CollapseReport
from .searches import SEARCHES, IterativeLossStrategy, RemovalStrategy, SpanStrategy, find_search

__all__ = ["SEARCHES", "IterativeLossStrategy", "RemovalStrategy", "SpanStrategy", "collapse", "prune"]


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
    flops_fraction: float | None = None,
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
    fingerprint: Mapping[str, Any] | None = None,
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
        flops_fraction: remove until the forward FLOPs (on ``example_inputs``) are at most this fraction of the
            uncollapsed model's (0 < f < 1); the removal that gets there is kept.
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
        resume_from: the progress folder of an interrupted run of the same model, scores and budget (of a finished
            run: its result, rebuilt from the folder).
        fingerprint: what else the run depends on, that a resumed run must share (e.g. ``{"data": digest}`` of the
            data the scores came from; see :func:`hf_collapse.engine.run_search`).
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
        flops_fraction=flops_fraction,
        num_blocks=num_blocks,
        max_metric_drop=max_metric_drop,
        max_metric_increase=max_metric_increase,
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
        fingerprint=fingerprint,
        show_progress=progress,
    )


def prune(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    method: str = "block_influence",
    *,
    granularity: str = "block",
    num_units: int | None = None,
    max_metric_delta: float | None = None,
    max_metric_ratio: float | None = None,
    flops_fraction: float | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    higher_is_better: bool = True,
    metric_name: str | None = None,
    example_inputs: Mapping[str, Any] | None = None,
    latency_repeats: int = 5,
    progress: bool = True,
    progress_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    per_flop: bool = False,
    **score_kwargs: Any,
) -> tuple[nn.Module, CollapseReport]:
    """Score and remove units of ``model`` under a budget with the field's depth-pruning methods, in one API.

    Methods (any registered scorer of :data:`hf_collapse.scoring.SCORERS` or search of
    :data:`hf_collapse.searches.SEARCHES`; built in):

    * a one-shot scorer of :func:`hf_collapse.score_blocks` (``"block_influence"`` (ShortGPT), ``"angular"``,
      ``"msw"``, ``"loss"`` (one-shot SLEB), ``"random"``): every unit scored once on ``batches``, removed lowest
      first (:func:`collapse`); ``granularity`` picks blocks or ``"attention"`` / ``"mlp"`` sub-layers;
    * ``"sleb"``: SLEB proper: at every step each remaining block is re-scored by the calibration loss of the current
      model without it, and the cheapest removed;
    * ``"blockpruner"``: BlockPruner / FinerCut: the same over every attention and MLP sub-layer (a layer's last
      sub-layer counts as its whole block); with ``per_flop=True``, the sub-layer removed at each step is the one of
      least loss increase per parameter (FLOP) it removes, for a FLOPs budget (plain BlockPruner spends it on the
      small attention sub-layers first);
    * ``"span"``: Gromov et al. / PruneMe: the contiguous span of ``num_units`` blocks whose input and output are
      closest by angular distance, removed at once (needs ``num_units``).

    ``batches`` are calibration batches (with labels for the loss-based methods). The budget (``flops_fraction``
    included: the one to give ``"blockpruner"``, whose units differ in size), evaluation, latency,
    progress folder and report are :func:`collapse`'s (the report's ``extra["search_cost"]`` says what the search
    cost: its seconds and forward passes). A search refuses, before any work, what it cannot do
    (:meth:`hf_collapse.searches.Search.check`): ``per_flop`` with a search that does not take it, a
    ``granularity`` with a search that chooses its own units, ``"span"`` without ``num_units``.

    Example::

        >>> smaller, report = hf_collapse.prune(llama, calibration_batches, method="sleb", num_units=4,
        ...                                     eval_fn=lambda m: perplexity(m, held_out), higher_is_better=False)
    """
    batches = list(batches)
    search = find_search(method)
    budget = Budget.from_arguments(
        where="hf_collapse.prune",
        higher_is_better=higher_is_better,
        num_units=num_units,
        max_metric_delta=max_metric_delta,
        max_metric_ratio=max_metric_ratio,
        flops_fraction=flops_fraction,
    )
    options = {"per_flop": True} if per_flop else {}
    search.check(budget, granularity, options)
    inputs = example_inputs if example_inputs is not None else adapter_for(model).example_inputs(model, batch_size=1)
    strategy, fingerprint = search.strategy(
        model,
        batches,
        budget,
        granularity=granularity,
        inputs=inputs,
        resume_from=resume_from,
        progress=progress,
        **options,
        **score_kwargs,
    )
    return run_search(
        model,
        strategy,
        budget,
        method=f"prune ({method})",
        evaluate=eval_fn,
        metric_name=metric_name,
        inputs=inputs,
        latency_repeats=latency_repeats,
        progress_dir=progress_dir,
        resume_from=resume_from,
        fingerprint=fingerprint,
        show_progress=progress,
    )

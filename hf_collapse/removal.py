"""Budgeted removal of blocks (or sub-layers), searches of the collapse engine: :func:`collapse` (units scored
once, lowest first) and :func:`prune` (the field's depth-pruning methods in one API: one-shot scorers, SLEB,
BlockPruner, PruneMe spans).

(The module is ``removal`` so that ``hf_collapse.collapse`` always names the function.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .architectures.base import Block, adapter_for
from .engine import Budget, Candidate, ProgressFolder, SearchStrategy, run_search
from .engine.progress import batches_digest, json_safe
from .metrics import module_flops
from .names import resolve_names
from .report import CollapseReport
from .surgery import block_aliases, find_blocks, remove_blocks

__all__ = ["SEARCHES", "IterativeLossStrategy", "RemovalStrategy", "SpanStrategy", "collapse", "prune"]


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
        fingerprint=fingerprint,
        show_progress=progress,
    )


# -- searches that re-score as they go ---------------------------------------------------------------------------

#: The searches of :func:`prune` besides the one-shot scorers of :func:`hf_collapse.score_blocks`.
SEARCHES = ("sleb", "blockpruner", "span")


class _OriginalNames:
    """The original name of each block still in the model, in forward order (blocks are renumbered by a removal)."""

    def __init__(self, model: nn.Module):
        self.alive = [block.name for block in find_blocks(model)]

    def of(self, model: nn.Module, unit: Block) -> str:
        """``unit``'s name in the original model (a block, or a sub-layer of one)."""
        blocks = find_blocks(model)
        position = next(i for i, b in enumerate(blocks) if (b.stage, b.index) == (unit.stage, unit.index))
        return self.alive[position] + unit.name[len(blocks[position].name) :]

    def remove(self, original: str) -> None:
        if original in self.alive:
            self.alive.remove(original)


class IterativeLossStrategy(SearchStrategy):
    """Re-score every remaining unit on the current model at each step and remove the one whose removal costs the
    least calibration loss (SLEB: blocks; BlockPruner: attention and MLP sub-layers, a layer's last sub-layer taken
    as its whole block). Each step costs a forward pass per candidate and batch, from the candidate's input on where
    the blocks before it can replay one full pass (:func:`hf_collapse.scoring.loss_scores`).

    With ``per_flop``, the unit removed is the one whose removal costs the least loss increase per parameter it
    removes (its matrix multiplications' FLOPs), not the least loss: units of unequal size (an attention sub-layer
    holds a third of an MLP's weights in Llama-like layers) are then compared by what they cost for what they save,
    which is what a FLOPs budget asks. The loss before removal comes from the full forward pass the scoring replays
    (:func:`hf_collapse.scoring.loss_scores_and_reference`)."""

    def __init__(
        self, model: nn.Module, batches: list[Mapping[str, Any]], granularity: str = "block", per_flop: bool = False
    ):
        if granularity not in ("block", "sublayer"):
            raise ValueError(f"granularity must be 'block' or 'sublayer', got {granularity!r}")
        self.batches, self.granularity, self.per_flop = batches, granularity, bool(per_flop)
        self.unit_name = "blocks" if granularity == "block" else "sub-layers"
        self.names = _OriginalNames(model)
        self.removed: list[str] = []
        self.forward_passes = 0
        self._proposed: dict[str, str] = {}
        # never the last block: with every block removable, one unit (the last block's last sub-layer) always stays
        self._initial = len(self._pool(model)) - int(all(b.removable for b in find_blocks(model)))

    def _pool(self, model: nn.Module) -> list[Block]:
        blocks = find_blocks(model)
        if self.granularity == "block":
            return [b for b in blocks if b.removable]
        by_position = {(b.stage, b.index): b for b in blocks}
        pool = []
        for kind in adapter_for(model).sublayer_kinds:
            for unit in find_blocks(model, kind):
                if unit.removable:
                    pool.append(unit)
                else:  # the layer's other sub-layer is gone: removing this one empties the layer, a block removal
                    pool.append(by_position[(unit.stage, unit.index)])
        return list({unit.name: unit for unit in pool}.values())

    def available(self) -> int:
        # an upper bound (the pool is re-read from the model at each step; propose() says when it is empty)
        return max(self._initial - len(self.removed), 0)

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        from .scoring import loss_scores_and_reference

        pool = self._pool(model)
        if len(find_blocks(model)) == 1:  # never the last block
            pool = [u for u in pool if u.kind != "block"]
        if not pool:
            return None
        losses, before = loss_scores_and_reference(model, self.batches, pool, progress=False)
        self.forward_passes += (len(pool) + 1) * len(self.batches)
        scores = losses
        if self.per_flop:  # the loss increase per million parameters removed
            scores = {u.name: (losses[u.name] - before) * 1e6 / max(u.params, 1) for u in pool}
        name = min(scores, key=scores.get)
        unit = next(u for u in pool if u.name == name)
        details = {"calibration_loss": losses[name], "parameters": unit.params} if self.per_flop else {}
        original = self.names.of(model, unit)
        self._proposed[original] = unit.kind
        return Candidate(
            units=[original], score=scores[name], apply=lambda m: remove_blocks(m, [name]), details=details
        )

    def accept(self, candidate: Candidate) -> None:
        original = candidate.units[0]
        if self._proposed.get(original) == "block":
            self.names.remove(original)
        self.removed.append(original)

    def state(self) -> dict[str, Any]:
        return {"alive": list(self.names.alive), "removed": list(self.removed), "forward_passes": self.forward_passes}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.names.alive, self.removed = list(state["alive"]), list(state["removed"])
        self.forward_passes = int(state["forward_passes"])

    def fingerprint(self) -> dict[str, Any]:
        strategy = f"iterative loss{' per FLOP' if self.per_flop else ''} ({self.granularity})"
        return {"strategy": strategy, "data": batches_digest(self.batches)}

    def cost(self) -> dict[str, Any]:
        return {"forward_passes": self.forward_passes}


class SpanStrategy(SearchStrategy):
    """Remove the contiguous span of ``length`` blocks whose input and output are closest, all at once (Gromov et al.,
    PruneMe): the angular distance ``arccos(cos(x, y)) / pi`` between the hidden state entering its first block and
    the one leaving its last, at each sequence's last real token (the one that has seen the whole sequence, left or
    right padding alike; a non-sequence feature map is compared whole), averaged over the calibration examples. One
    pass over the calibration batches with hooks on every block."""

    def __init__(self, model: nn.Module, batches: list[Mapping[str, Any]], length: int):
        self.batches, self.length = batches, int(length)
        self.spans: dict[tuple[str, ...], float] = {}
        self.done = False

    def measure(self, model: nn.Module) -> None:
        """The angular distance of every span of ``length`` consecutive blocks of one stage."""
        import math

        import torch

        from .block_io import BlockIO
        from .scoring import model_inputs

        blocks = [b for b in find_blocks(model) if b.removable]
        stages: dict[int, list[Block]] = {}
        for block in blocks:
            stages.setdefault(block.stage, []).append(block)
        sums: dict[tuple[str, ...], float] = {}
        examples = 0
        io = BlockIO(model, blocks, detach=True)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    batch = model_inputs(model, batch)
                    with io.capturing():
                        model(**batch)
                    mask = batch.get("attention_mask")
                    for stage in stages.values():
                        for start in range(len(stage) - self.length + 1):
                            span = stage[start : start + self.length]
                            x = _last_token(io.raw(span[0].name)[0], mask)
                            y = _last_token(io.raw(span[-1].name)[1], mask)
                            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1)
                            key = tuple(b.name for b in span)
                            sums[key] = sums.get(key, 0.0) + float(torch.arccos(cos).sum()) / math.pi
                    examples += int(io.raw(blocks[0].name)[0].shape[0])
        finally:
            io.remove()
            model.train(was_training)
        self.spans = {span: total / max(examples, 1) for span, total in sums.items()}
        if not self.spans:
            raise ValueError(f"no stage of this model has {self.length} consecutive removable blocks")

    def available(self) -> int:
        return 0 if self.done else self.length

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        if self.done or room < self.length:
            return None
        span = min(self.spans, key=self.spans.get)
        return Candidate(units=list(span), score=self.spans[span], apply=lambda m: remove_blocks(m, list(span)))

    def accept(self, candidate: Candidate) -> None:
        self.done = True

    def state(self) -> dict[str, Any]:
        return {"done": self.done}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.done = bool(state["done"])

    def fingerprint(self) -> dict[str, Any]:
        return {"strategy": "span", "length": self.length, "data": batches_digest(self.batches)}

    def report_scores(self) -> dict[str, float]:
        return {" .. ".join((span[0], span[-1])): value for span, value in self.spans.items()}

    def cost(self) -> dict[str, Any]:
        return {"forward_passes": len(self.batches)}


def _last_token(hidden: Any, attention_mask: Any) -> Any:
    """``(batch, features)`` in float64: each sequence's last real token, or the whole feature map of an example."""
    import torch

    hidden = hidden.double()
    if hidden.dim() != 3:
        return hidden.flatten(1)
    if attention_mask is None or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        return hidden[:, -1]
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    return hidden[torch.arange(hidden.shape[0]), last]


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

    Methods:

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
    cost: its seconds and forward passes).

    Example::

        >>> smaller, report = hf_collapse.prune(llama, calibration_batches, method="sleb", num_units=4,
        ...                                     eval_fn=lambda m: perplexity(m, held_out), higher_is_better=False)
    """
    from .scoring import DATA_FREE, SCORERS, score_blocks

    batches = list(batches)
    one_shot = [*SCORERS, "loss", *DATA_FREE]
    if per_flop and method != "blockpruner":
        raise ValueError(
            f"per_flop ranks units of unequal size, which only method 'blockpruner' mixes (got {method!r}: its units "
            "all remove the same FLOPs)"
        )
    if method in one_shot:
        import time

        start = time.perf_counter()
        data = {"data": batches_digest(batches), "scorer": json_safe({"method": method, **score_kwargs})}
        scores = _saved_scores(resume_from, data) if resume_from is not None else None
        if scores is None:  # a resumed run scored on the same data takes its scores from the folder
            scores = score_blocks(
                model, batches, method=method, granularity=granularity, progress=progress, **score_kwargs
            )
        seconds = time.perf_counter() - start
        collapsed, report = collapse(
            model,
            scores,
            num_units=num_units,
            max_metric_delta=max_metric_delta,
            eval_fn=eval_fn,
            higher_is_better=higher_is_better,
            max_metric_ratio=max_metric_ratio,
            flops_fraction=flops_fraction,
            metric_name=metric_name,
            example_inputs=example_inputs,
            latency_repeats=latency_repeats,
            method=f"prune ({method})",
            progress=progress,
            granularity=granularity,
            progress_dir=progress_dir,
            resume_from=resume_from,
            fingerprint=data,
        )
        report.extra["search_cost"] = {
            "scoring_seconds": round(seconds, 2),
            "forward_passes": _one_shot_passes(method, model, batches, granularity),
        }
        return collapsed, report
    if method not in SEARCHES:
        raise ValueError(f"unknown pruning method {method!r}; accepted: {', '.join([*one_shot, *SEARCHES])}")
    if granularity != "block":
        raise ValueError(f"method {method!r} chooses its own units: leave granularity='block'")
    budget = Budget.from_arguments(
        where="hf_collapse.prune",
        higher_is_better=higher_is_better,
        num_units=num_units,
        max_metric_delta=max_metric_delta,
        max_metric_ratio=max_metric_ratio,
        flops_fraction=flops_fraction,
    )
    if budget.needs_metric and eval_fn is None:
        raise ValueError("a metric budget (max_metric_delta / max_metric_ratio) needs eval_fn")
    if method == "span":
        if budget.num_units is None:
            raise ValueError("method 'span' removes num_units consecutive blocks at once: give num_units")
        strategy: SearchStrategy = SpanStrategy(model, batches, budget.num_units)
        strategy.measure(model)
    else:
        strategy = IterativeLossStrategy(model, batches, "block" if method == "sleb" else "sublayer", per_flop)
    return run_search(
        model,
        strategy,
        budget,
        method=f"prune ({method})",
        evaluate=eval_fn,
        metric_name=metric_name,
        inputs=example_inputs,
        latency_repeats=latency_repeats,
        progress_dir=progress_dir,
        resume_from=resume_from,
        show_progress=progress,
    )


def _saved_scores(folder: str | os.PathLike, data: Mapping[str, Any]) -> dict[str, float] | None:
    """The scores a one-shot run saved in its progress folder, when it scored the same data with the same scorer
    (else ``None``: score again, and the resume's own checks say what differs)."""
    saved = ProgressFolder(folder).read()["fingerprint"]
    if any(saved.get(key) != value for key, value in json_safe(dict(data)).items()):
        return None
    scores = (saved.get("search") or {}).get("scores")
    return dict(scores) if isinstance(scores, dict) else None


def _one_shot_passes(method: str, model: nn.Module, batches: list, granularity: str) -> int:
    """Forward passes a one-shot scorer took: one per batch, and one more per unit and batch for ``"loss"``."""
    if method == "random":
        return 0
    if method == "loss":
        return (len(find_blocks(model, granularity)) + 1) * len(batches)
    return len(batches)

"""Budgeted removal of blocks in ascending score order, measured at every step: :func:`collapse`.

(The module is ``removal`` so that ``hf_collapse.collapse`` always names the function.)
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Mapping

from torch import nn
from tqdm.auto import tqdm

from .architectures.base import adapter_for, unwrap_model
from .distributed import is_main_process
from .names import resolve_names
from .metrics import (
    compare_latency, count_parameters, forward_flops, hardware_description, measure_latency, module_flops,
)
from .report import CollapseReport, CollapseStep
from .surgery import block_aliases, find_blocks, model_class_name, remove_blocks

__all__ = ["collapse", "evaluate_model", "measure_step", "metric_key"]

logger = logging.getLogger(__name__)


def measure_step(model: nn.Module, inputs: Mapping[str, Any], latency_repeats: int,
                 reference: nn.Module | None = None, flops: int | None = None) -> dict[str, Any]:
    """Parameters, FLOPs and (when ``latency_repeats > 0``) latency of ``model`` on ``inputs``.

    With a ``reference`` (the uncollapsed model), the two are timed side by side in ``latency_repeats`` interleaved
    rounds (:func:`hf_collapse.metrics.compare_latency`), and the result carries the speed-up over the reference with
    its spread: a ratio that survives a busy machine. Without one, ``latency_s`` is a plain median. Measured in eval
    mode (the train/eval mode is restored after); latency fields are ``None`` when ``latency_repeats`` is 0. ``flops``,
    when known (e.g. derived from a first count), is taken as is instead of counting a forward pass again.

    Example::

        >>> from hf_collapse.removal import measure_step
        >>> measure_step(model, hf_collapse.metrics.example_inputs(model), latency_repeats=0)    # all-MiniLM-L6-v2
        {'params': 22713216, 'flops': 2718203904, 'latency_s': None}
        >>> measure_step(collapsed, inputs, latency_repeats=7, reference=model)["latency_speedup"]
        1.46
    """
    was_training = model.training
    model.eval()
    try:
        measured: dict[str, Any] = {"params": count_parameters(model),
                                    "flops": forward_flops(model, inputs) if flops is None else int(flops),
                                    "latency_s": None}
        if latency_repeats and reference is not None:
            timing = compare_latency([reference, model], inputs, rounds=latency_repeats)
            measured.update(latency_s=timing.seconds[1], latency_speedup=timing.speedups[1],
                            latency_spread=list(timing.spreads[1]), reference_latency_s=timing.seconds[0])
        elif latency_repeats:
            measured["latency_s"] = measure_latency(model, inputs, warmup=2, repeats=latency_repeats)
        return measured
    finally:
        model.train(was_training)


def metric_key(args, has_compute_metrics: bool) -> tuple[str, bool]:
    """The evaluation metric a compression budget refers to, and whether higher is better:
    ``args.metric_for_best_model`` if set, else ``accuracy`` with ``compute_metrics``, else the loss.

    The name carries the ``eval_`` prefix of ``Trainer.evaluate``'s keys. Without ``metric_for_best_model``,
    ``compute_metrics`` is assumed to return an ``"accuracy"`` entry.

    Example::

        >>> from hf_collapse.removal import metric_key
        >>> metric_key(TrainingArguments("out"), has_compute_metrics=True)
        ('eval_accuracy', True)
        >>> metric_key(TrainingArguments("out", metric_for_best_model="f1"), has_compute_metrics=True)
        ('eval_f1', True)
    """
    name = args.metric_for_best_model or ("accuracy" if has_compute_metrics else "loss")
    name = name if name.startswith("eval_") else f"eval_{name}"
    higher = args.greater_is_better if args.metric_for_best_model else not name.endswith("loss")
    return name, bool(higher)


def evaluate_model(model: nn.Module, args, eval_dataset, **trainer_kwargs) -> dict[str, float]:
    """Evaluate ``model`` with a fresh ``transformers.Trainer`` built from ``args`` (reporting disabled) and
    ``trainer_kwargs`` (``data_collator``, ``compute_metrics``, ``processing_class``, ``compute_loss_func``).

    ``args`` itself is not modified (a copy is used, with the LaCoOT penalty off for ``LaCoOTArguments``).
    Returns ``Trainer.evaluate``'s metrics, keys prefixed with ``eval_``.

    Example::

        >>> from hf_collapse.removal import evaluate_model
        >>> metrics = evaluate_model(model, TrainingArguments("out"), test,
        ...                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
        >>> metrics["eval_loss"], metrics["eval_accuracy"]
    """
    from transformers import Trainer, TrainingArguments

    args = copy.deepcopy(args)
    args.report_to = []
    if type(args) is not TrainingArguments and hasattr(args, "msw_weight"):
        args.msw_weight = 0.0
    try:
        return Trainer(model=model, args=args, eval_dataset=eval_dataset, **trainer_kwargs).evaluate()
    finally:
        # accelerate marks a model it prepared, and never wraps a marked model (or a deep copy of it) again: a
        # later fine-tuning Trainer would then train without DDP and the ranks would drift apart.
        model.__dict__.pop("_is_accelerate_prepared", None)


def _canonical_scores(model: nn.Module, scores: Mapping[str, float], granularity: str = "block") -> dict[str, float]:
    """``scores`` keyed by the blocks' names in ``model`` (any accepted spelling may be given)."""
    if not scores:
        raise ValueError("no scores given: the budget selects nothing (use hf_collapse.score_blocks to get scores)")
    blocks = find_blocks(model, granularity)
    scored = resolve_names(list(scores), {b.name: b for b in blocks}, "block", aliases=block_aliases(blocks),
                           where="this model (scores name them)")
    fixed = [b.name for b in scored if not b.removable]
    if fixed:
        raise ValueError(f"scores name blocks that are not removable: {fixed} ({scored[0].reason})")
    return {b.name: float(value) for b, value in zip(scored, scores.values())}


def _removal_order(model: nn.Module, scores: Mapping[str, float], granularity: str = "block") -> list[str]:
    position = {b.name: i for i, b in enumerate(find_blocks(model, granularity))}
    return sorted(scores, key=lambda name: (scores[name], position[name]))


def collapse(
    model: nn.Module,
    scores: Mapping[str, float],
    num_blocks: int | None = None,
    max_metric_drop: float | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    finetune: Callable[[nn.Module], nn.Module | None] | None = None,
    *,
    higher_is_better: bool = True,
    max_metric_increase: float | None = None,
    max_metric_ratio: float | None = None,
    metric_name: str | None = None,
    example_inputs: Mapping[str, Any] | None = None,
    latency_repeats: int = 5,
    method: str = "collapse",
    progress: bool = True,
    granularity: str = "block",
) -> tuple[nn.Module, CollapseReport]:
    """Remove blocks in ascending score order under a budget, measuring the model at every step.

    Args:
        model: the model to collapse; it is not modified.
        scores: ``{block name: score}`` (from :func:`hf_collapse.score_blocks` or ``LaCoOTTrainer.block_scores``);
            only these blocks are candidates, lowest score first.
        num_blocks: remove (at most) this many blocks.
        max_metric_drop: remove greedily while ``eval_fn`` stays within this drop of the uncollapsed model's
            metric; the step that would exceed it is not kept and the collapse stops there.
        eval_fn: ``model -> metric``, evaluated before and after each removal (required with ``max_metric_drop``).
        finetune: ``model -> model`` run after each removal, before evaluation (e.g. a short healing fine-tune).
        higher_is_better: the metric's direction (``False`` for a loss or a perplexity).
        max_metric_increase: for a metric where lower is better (``higher_is_better=False``): remove while it stays
            within this increase of the uncollapsed model's (the same budget as ``max_metric_drop``, named for it).
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

    Returns:
        ``(collapsed_model, report)``: a new model, and the :class:`CollapseReport` of every step.

    Example::

        >>> scores = hf_collapse.score_blocks(model, loader, method="msw")
        >>> smaller, report = hf_collapse.collapse(model, scores, max_metric_drop=0.01, eval_fn=accuracy)
        >>> report.save("outputs/collapse")
    """
    scores = _canonical_scores(model, scores, granularity)
    order = _removal_order(model, scores, granularity)
    if max_metric_increase is not None:
        if higher_is_better:
            raise ValueError("max_metric_increase is the budget of a metric where lower is better: pass "
                             "higher_is_better=False, or use max_metric_drop for a metric where higher is better")
        if max_metric_drop is not None:
            raise ValueError("pass max_metric_increase or max_metric_drop, not both (they are the same budget)")
        max_metric_drop, budget_name = max_metric_increase, "max_metric_increase"
    else:
        budget_name = "max_metric_drop"
    if max_metric_ratio is not None and max_metric_ratio < 1:
        raise ValueError(f"max_metric_ratio must be >= 1 (the metric may get this many times worse), got "
                         f"{max_metric_ratio}")
    metric_budget = max_metric_drop is not None or max_metric_ratio is not None
    if num_blocks is None and not metric_budget:
        raise ValueError("no budget: pass num_blocks, a metric budget (max_metric_drop / max_metric_increase / "
                         "max_metric_ratio, with eval_fn), or both")
    if metric_budget and eval_fn is None:
        raise ValueError(f"{budget_name if max_metric_drop is not None else 'max_metric_ratio'} needs eval_fn, the "
                         "function that evaluates the metric of a model")
    if max_metric_drop is not None and max_metric_drop < 0:
        raise ValueError(f"{budget_name} must be >= 0, got {max_metric_drop}")
    all_blocks = [b.name for b in find_blocks(model, granularity)]
    if num_blocks is not None and not 1 <= num_blocks <= len(order):
        raise ValueError(f"num_blocks must be between 1 and the {len(order)} scored blocks, got {num_blocks}")
    limit = min(num_blocks if num_blocks is not None else len(order), len(all_blocks) - 1)

    inputs = example_inputs if example_inputs is not None else adapter_for(model).example_inputs(model, batch_size=1)
    adapter = adapter_for(model)
    report = CollapseReport(
        method=method, model_class=model_class_name(model), family=adapter.family, metric_name=metric_name,
        higher_is_better=higher_is_better, hardware=hardware_description(model) if latency_repeats else "",
        budget={"num_blocks": num_blocks, budget_name: max_metric_drop,
                **({"max_metric_ratio": max_metric_ratio} if max_metric_ratio is not None else {})},
        scores=dict(scores),
    )
    # FLOPs are counted once: a removed unit takes exactly its own FLOPs away (the rest of the forward is unchanged).
    by_name = {b.name: b for b in find_blocks(model, granularity)}
    unit_paths = {name: (by_name[name].path, *by_name[name].extra_paths) for name in order[:limit]}
    total_flops, path_flops = module_flops(model, inputs, [p for paths in unit_paths.values() for p in paths])
    unit_flops = {name: sum(path_flops[p] for p in paths) for name, paths in unit_paths.items()}
    baseline = eval_fn(model) if eval_fn else None
    report.steps.append(CollapseStep(removed=0, unit=None, score=None, metric=baseline,
                                     **measure_step(model, inputs, latency_repeats, flops=total_flops)))

    current = model
    alive = list(all_blocks)  # original names of the blocks still in `current`, in order
    bar = tqdm(order[:limit], desc="collapsing", disable=not (progress and is_main_process()))
    for name in bar:
        current_name = find_blocks(current, granularity)[alive.index(name)].name
        bar.set_postfix_str(f"removing {current_name}")
        trial = remove_blocks(current, [current_name])
        if finetune is not None:
            bar.set_postfix_str(f"fine-tuning without {current_name}")
            trial = finetune(trial) or trial
        if eval_fn:
            bar.set_postfix_str(f"evaluating without {current_name}")
        metric = eval_fn(trial) if eval_fn else None
        drop = None if metric is None else (baseline - metric if higher_is_better else metric - baseline)
        kept = (max_metric_drop is None or drop <= max_metric_drop) and (
            max_metric_ratio is None or (metric * max_metric_ratio >= baseline if higher_is_better
                                         else metric <= max_metric_ratio * baseline))
        if kept and latency_repeats:
            bar.set_postfix_str(f"timing against the original ({latency_repeats} rounds)")
        step = CollapseStep(removed=len(all_blocks) - len(alive) + 1, unit=name, score=float(scores[name]),
                            metric=metric, kept=kept,
                            **measure_step(trial, inputs, latency_repeats if kept else 0, reference=model,
                                           flops=report.after.flops - unit_flops[name]))
        report.steps.append(step)
        if not kept:
            logger.info("removing %s would take the metric from %.4f to %.4f, over the budget %s: stopping", name,
                        baseline, metric, {k: v for k, v in report.budget.items() if k != "num_blocks"})
            break
        current = trial
        alive.remove(name)

    report.pool_reference_latency()
    if current is model:
        logger.warning("the budget allowed no removal: returning an unmodified copy of the model")
        current = copy.deepcopy(unwrap_model(model, keep_peft=True))  # a LoRA-wrapped model stays wrapped
    return current, report

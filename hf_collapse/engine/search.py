"""The one budgeted-collapse loop: propose, apply, fine-tune, evaluate, keep or undo under a :class:`Budget`,
measure, report; resumable from a progress folder.

A search is a :class:`SearchStrategy`: at each step it proposes a :class:`Candidate`, a recorded structural edit of the
current model (remove the block of lowest score, linearize the activation layer of smallest loss gap, ...). The loop
applies it to a copy, fine-tunes and evaluates the result when asked, keeps it if the budget allows or stops there
(the model returned always honours the budget), measures parameters, FLOPs and latency of every kept state beside the
original, and writes the run's progress after every step. :func:`hf_collapse.collapse` (block and sub-layer removal,
used by ``LaCoOTTrainer.collapse`` and ``hf-collapse prune``) and :func:`hf_collapse.tlc.compress` are strategies of
this loop and nothing more.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..architectures.base import adapter_for, unwrap_model
from ..budget import Budget
from ..distributed import is_main_process, world_size
from ..metrics import hardware_description, measure_step
from ..report import CollapseReport, CollapseStep
from ..surgery import collapse_record, edit_op, model_class_name
from . import progress as progress_format
from .progress import ProgressFolder

__all__ = ["Candidate", "SearchStrategy", "run_search"]

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One step a strategy proposes.

    Attributes:
        units: the units it collapses, named as in the original model (for the report).
        score: the strategy's score of the step (lower: better).
        apply: ``model -> new model`` with the edit applied and recorded (the argument is left as it is).
        details: strategy-specific numbers for the report (TLC: the neurons ON and OFF).
        flops: the FLOPs of the model after the step, when the strategy knows them without counting.
    """

    units: list[str]
    score: float
    apply: Callable[[nn.Module], nn.Module]
    details: dict[str, Any] = field(default_factory=dict)
    flops: int | None = None


class SearchStrategy:
    """What a search decides; the loop (:func:`run_search`) does the rest.

    Subclasses implement :meth:`propose` and :meth:`accept`, and :meth:`state` / :meth:`restore` for what they need to
    go on after an interruption (JSON-serialisable), and :meth:`fingerprint` for the settings a resumed run must share.
    """

    #: What the units are, for the report ("blocks", "activation layers", "attention sub-layers").
    unit_name: str = "blocks"
    #: Whether the edits change weights beyond what replaying them on the original weights gives (TLC's fused maps):
    #: the progress folder then saves the weights after every step.
    edits_change_weights: bool = False

    def available(self) -> int:
        """How many units are left to propose."""
        raise NotImplementedError

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        """The next step on ``model`` (the current state), collapsing at most ``room`` units; ``None`` to stop."""
        raise NotImplementedError

    def accept(self, candidate: Candidate) -> None:
        """``candidate`` was kept: the units it collapsed are gone."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        pass

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def report_scores(self) -> dict[str, float]:
        """The scores the report lists (a removal's per-unit scores; none for TLC, whose gaps change every step)."""
        return {}

    def cost(self) -> dict[str, Any]:
        """What the search itself cost beyond the loop's evaluations (e.g. its forward passes), for the report."""
        return {}

    def least_flops(self) -> int | None:
        """The fewest forward FLOPs the search can reach (every unit it may remove removed), when it knows them
        before it starts; ``None`` otherwise. A FLOPs budget below it is refused up front."""
        return None


def _edits_since(model: nn.Module, original_edits: int) -> list[dict[str, Any]]:
    record = collapse_record(model)
    return record["edits"][original_edits:] if record else []


def _stop_reason(report: CollapseReport, budget: Budget) -> tuple[str, bool]:
    """Why the search stopped, and whether that met the budget: a target it sets (a number of units, a share of the
    FLOPs) is missed when the search ran out of units before reaching it (a metric limit is a bound, never a target)."""
    if not report.steps[-1].kept:
        return "metric", True
    if budget.flops_reached(report.before.flops, report.after.flops):
        return "flops_fraction", True
    if budget.num_units is not None and report.after.removed >= budget.num_units:
        return "num_units", True
    return "exhausted", budget.num_units is None and budget.flops_fraction is None


def run_search(
    model: nn.Module,
    strategy: SearchStrategy,
    budget: Budget,
    *,
    method: str,
    evaluate: Callable[[nn.Module], float] | None = None,
    finetune: Callable[[nn.Module], nn.Module | None] | None = None,
    metric_name: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    latency_repeats: int = 5,
    reference: nn.Module | None = None,
    progress_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    description: str = "collapsing",
    extra: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, CollapseReport]:
    """Run ``strategy`` on ``model`` until ``budget`` stops it; returns ``(collapsed model, report)``.

    Args:
        model: where the search starts; it is not modified (every step applies its edit to a copy).
        strategy: what to collapse at each step.
        budget: how far to go (a metric budget needs ``evaluate``).
        method: the method name in the report ("collapse", "LaCoOT", "TLC", ...).
        evaluate: ``model -> metric``, evaluated before the search and after every step.
        finetune: ``model -> model`` run after each step, before evaluation (e.g. a short healing fine-tune).
        metric_name: the metric's name in the report.
        inputs: inputs for FLOPs and latency (default: the adapter's example inputs at batch size 1).
        latency_repeats: interleaved rounds timing every kept state beside ``reference`` (0: no latency).
        reference: the uncollapsed model the states are timed beside (default: ``model``).
        progress_dir: write the run's progress there after every step (:mod:`hf_collapse.engine.progress`); a folder
            that holds an unfinished run is not overwritten (resume it, or delete it).
        resume_from: continue the interrupted run whose progress folder this is (same model, strategy settings,
            budget and data): its edits are replayed on a copy of ``model``, its weights restored when the strategy's
            steps change weights, and the run ends where an uninterrupted one ends.
        fingerprint: what else the run depends on and a resumed run must share (``"training"``: the fine-tuning's
            ``TrainingArguments`` fields, ``"data"``: a digest of the calibration batches).
        show_progress: a progress bar (main process only).
        description: the progress bar's label.
        extra: settings recorded in the report (``report.extra``).

    Raises:
        ValueError: for a metric budget without ``evaluate``, an unfinished progress folder without ``resume_from``, or
            a ``resume_from`` folder written for another model, strategy, budget or data, or for a finished run.
    """
    if budget.needs_metric and evaluate is None:
        raise ValueError(
            "a metric budget (max_metric_delta / max_metric_ratio) needs eval_fn, the function that evaluates the "
            "metric of a model (or an eval_dataset)"
        )
    if resume_from is None and budget.num_units is not None and budget.num_units > strategy.available():
        raise ValueError(
            f"num_units = {budget.num_units}, but this search can remove at most {strategy.available()} of this "
            f"model's {strategy.unit_name} (a model keeps at least one block): ask for at most that many"
        )
    original = unwrap_model(model, keep_peft=True)
    reference = original if reference is None else reference
    model_class = model_class_name(original)
    adapter = adapter_for(original)
    folder = ProgressFolder(progress_dir or resume_from) if (progress_dir or resume_from) else None
    if folder is not None and resume_from is None and folder.exists() and folder.read().get("status") != "finished":
        raise ValueError(
            f"{folder.path} holds an unfinished run: pass resume_from={str(folder.path)!r} to continue "
            "it, or delete the folder (or choose another progress_dir) to start over"
        )
    original_edits = len((collapse_record(original) or {}).get("edits", []))
    saves_weights = strategy.edits_change_weights or finetune is not None
    run_fingerprint = {
        **progress_format.model_fingerprint(original, model_class),
        "search": progress_format.json_safe(strategy.fingerprint()),
        "budget": progress_format.json_safe(budget.to_dict()),
        "world_size": world_size(),
        **progress_format.json_safe(dict(fingerprint or {})),
    }
    inputs = inputs if inputs is not None else adapter.example_inputs(original, batch_size=1)
    current = original

    def save_progress(report: CollapseReport, status: str) -> None:
        if folder is None or not is_main_process():
            return
        record = collapse_record(current)
        state = {
            "status": status,
            "step": len(report.steps) - 1,
            "fingerprint": run_fingerprint,
            "search": progress_format.json_safe(strategy.state()),
            "edits": _edits_since(current, original_edits),
            "record": record,
            "rng": progress_format.rng_state(),
            "report": report.to_dict(),
        }
        # the weights go with the progress whenever replaying the edits does not rebuild them, the final state's too:
        # a finished run's result can then be rebuilt from its folder
        keep_weights = saves_weights and current is not original
        folder.write(state, current if keep_weights else None, report.to_json())

    if resume_from is not None:
        state = ProgressFolder(resume_from).read()
        problems = progress_format.compare_fingerprints(state["fingerprint"], run_fingerprint, is_main_process())
        progress_format.refuse_everywhere(problems, Path(resume_from), f"this {method} run")
        if state["status"] == "finished" and saves_weights and state["edits"] and state.get("weights") is None:
            raise ValueError(
                f"the run in {resume_from} has already finished, and its folder (written by an earlier version) does "
                f"not keep its final weights (its report is {Path(resume_from) / 'report.json'}); start a new run "
                "without resume_from"
            )
        if state["edits"]:
            current = copy.deepcopy(original)
            for edit in state["edits"]:
                edit_op(edit["op"]).replay(current, edit)
            if progress_format.json_safe(collapse_record(current)) != state["record"]:
                raise ValueError(f"replaying the edits saved in {resume_from} does not rebuild the recorded structure")
            ProgressFolder(resume_from).load_weights(current, state)
        report = CollapseReport.from_dict(state["report"])
        strategy.restore(state["search"])
        progress_format.set_rng_state(state["rng"])
        if state["status"] == "finished":
            logger.info("the %s run in %s had finished: its result is rebuilt from its folder", method, resume_from)
            return (current if current is not original else copy.deepcopy(original)), report
        logger.info(
            "resuming %s from %s after step %d (%d %s collapsed)",
            method,
            resume_from,
            state["step"],
            report.after.removed,
            strategy.unit_name,
        )
    else:
        report = CollapseReport(
            method=method,
            model_class=model_class,
            family=adapter.family,
            unit_name=strategy.unit_name,
            metric_name=metric_name,
            higher_is_better=budget.higher_is_better,
            budget=budget.to_dict(),
            hardware=hardware_description(original) if latency_repeats else "",
            scores=strategy.report_scores(),
            extra=dict(extra or {}),
        )
        baseline = evaluate(original) if evaluate else None
        report.steps.append(
            CollapseStep(
                removed=0, unit=None, score=None, metric=baseline, **measure_step(original, inputs, latency_repeats)
            )
        )
        save_progress(report, "running")

    baseline = report.steps[0].metric
    if budget.flops_fraction is not None and not report.steps[0].flops:
        raise ValueError(
            f"a FLOPs budget (flops_fraction) needs the model's FLOPs, and torch counted none for this "
            f"{model_class} on the example inputs: pass inputs it computes on (example_inputs=...), or another budget"
        )
    least = strategy.least_flops()
    if (
        budget.flops_fraction is not None
        and least is not None
        and not budget.flops_reached(report.steps[0].flops, least)
    ):
        raise ValueError(
            f"flops_fraction = {budget.flops_fraction}, but removing every {strategy.unit_name[:-1]} this search may "
            f"remove leaves {least / report.steps[0].flops:.3f} of the original FLOPs: ask for at least that share"
        )
    limit = report.after.removed + budget.units_to_try(strategy.available())
    if budget.num_units is not None:
        limit = min(limit, int(budget.num_units))
    search_seconds = float((report.extra.get("search_cost") or {}).get("search_seconds", 0.0))
    bar = tqdm(
        total=limit, initial=report.after.removed, desc=description, disable=not (show_progress and is_main_process())
    )
    try:
        # a FLOPs budget ends the search at the first state that reaches it (checked here too: a resumed run)
        while report.after.removed < limit and not budget.flops_reached(report.steps[0].flops, report.after.flops):
            started = time.perf_counter()
            candidate = strategy.propose(current, limit - report.after.removed)
            search_seconds += time.perf_counter() - started
            if candidate is None:
                break
            names = ", ".join(candidate.units)
            bar.set_postfix_str(f"applying {names}")
            trial = candidate.apply(current)
            if finetune is not None:
                bar.set_postfix_str(f"fine-tuning after {names}")
                trial = finetune(trial) or trial
            if evaluate is not None:
                bar.set_postfix_str(f"evaluating after {names}")
            metric = evaluate(trial) if evaluate is not None else None
            kept = budget.allows(baseline, metric)
            if kept and latency_repeats:
                bar.set_postfix_str(f"timing against the original ({latency_repeats} rounds)")
            report.steps.append(
                CollapseStep(
                    removed=report.after.removed + len(candidate.units),
                    unit=names,
                    score=float(candidate.score),
                    metric=metric,
                    kept=kept,
                    details=candidate.details,
                    **measure_step(
                        trial, inputs, latency_repeats if kept else 0, reference=reference, flops=candidate.flops
                    ),
                )
            )
            if not kept:
                logger.info(
                    "%s would take the metric from %.4f to %.4f, over the budget %s: undone, stopping",
                    names,
                    baseline,
                    metric,
                    budget.to_dict(),
                )
                break
            current = trial
            strategy.accept(candidate)
            if strategy.cost():
                report.extra["search_cost"] = {"search_seconds": round(search_seconds, 2), **strategy.cost()}
            bar.update(len(candidate.units))
            save_progress(report, "running")
    except BaseException:
        if folder is not None and is_main_process() and folder.exists():
            logger.warning(
                "%s interrupted; the progress of its last finished step is in %s: run it again with "
                "resume_from=%r to continue",
                method,
                folder.path,
                str(folder.path),
            )
        raise
    finally:
        bar.close()
    if strategy.cost():
        report.extra["search_cost"] = {"search_seconds": round(search_seconds, 2), **strategy.cost()}
    report.pool_reference_latency()
    report.stopped_by, report.budget_met = _stop_reason(report, budget)
    if report.budget_met is False:
        logger.warning("%s: %s", method, report.budget_sentence().replace("**", ""))
    save_progress(report, "finished")
    if current is original:
        logger.warning("the budget allowed no step: returning an unmodified copy of the model")
        current = copy.deepcopy(original)  # a peft-wrapped model stays wrapped
    return current, report

"""Remove → heal → measure → record, for any job: :func:`run_pipeline`.

A compression job is the same steps whatever removes the units (a LaCoOT collapse, a pruning search, TLC's
linearization): remove under a budget decided on validation data; save what that gave, before anything that can still
fail; heal it if asked (any registered healing method, :data:`hf_collapse.healing.HEALING`) and measure the budget's
metric again on the validation data; measure every stage (original, after removal, after healing) on test data into
the report; compare the original and the final model side by side where asked (generation speed); save the final
model with its card. The commands (``hf-collapse lacoot | tlc | prune``) parse their flags and call it; Python code
calls it the same way.

Example::

    >>> from hf_collapse.pipeline import Healing, run_pipeline
    >>> final, report = run_pipeline(
    ...     model,
    ...     lambda: hf_collapse.prune(model, calibration, method="sleb", num_units=4, eval_fn=on_validation,
    ...                               higher_is_better=False, metric_name="perplexity"),
    ...     healing=Healing("lora", train_windows, args=TrainingArguments("heal", max_steps=100)),
    ...     validation_metric=on_validation,
    ...     measure=lambda m, stage, report: report.record("perplexity on news", stage, on_test(m),
    ...                                                    metric="perplexity", higher_is_better=False),
    ...     save=lambda m, report: hf_collapse.hub.save_with_card(m, "out/collapsed", report),
    ... )
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .healing import heal
from .report import CollapseReport

__all__ = ["Healing", "run_pipeline"]


@dataclass
class Healing:
    """How to heal the collapsed model (:func:`hf_collapse.heal`).

    Attributes:
        method: a registered healing method (``"distill"``, ``"lora"``, ``"linear"``, or one of yours).
        data: the healing data (training data, not the validation or the test data).
        teacher: the uncollapsed model (what distillation and the linear map learn from).
        args: ``transformers.TrainingArguments`` of a method that trains.
        options: the method's own options (``r``, ``data_collator``, ``distill_alpha``, ...).
        described: the healing data in words, for ``report.data_roles["healing"]``.
        extra: what the report records of this healing (``report.extra``: windows, mix).
    """

    method: str
    data: Any
    teacher: nn.Module | None = None
    args: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    described: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _quiet(what: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def run_pipeline(
    original: nn.Module,
    remove: Callable[[], tuple[nn.Module, CollapseReport]],
    *,
    healing: Healing | Callable[[], Healing] | None = None,
    validation_metric: Callable[[nn.Module], float] | None = None,
    measure: Callable[[nn.Module, str, CollapseReport], Any] | None = None,
    compare: Callable[[nn.Module, nn.Module, CollapseReport], Any] | None = None,
    save: Callable[[nn.Module, CollapseReport], Any] | None = None,
    data_roles: Mapping[str, str] | None = None,
    on_failure: Callable[[BaseException], Any] | None = None,
    phase: Callable[[str], contextlib.AbstractContextManager] = _quiet,
) -> tuple[nn.Module, CollapseReport]:
    """Remove, save, heal, measure every stage, compare, save again; returns ``(final model, report)``.

    Args:
        original: the model before removal (measured as the ``"original"`` stage, the teacher's default).
        remove: ``() -> (collapsed, report)``: the removal under its budget (decided on validation data).
        healing: how to heal the collapsed model, or a function that says it when healing starts (its data and
            ``TrainingArguments`` made then, not before the removal); ``None``: not healed, nor is a model with nothing
            removed.
        validation_metric: ``model -> metric`` on the data that decided the budget, measured again after healing
            (:meth:`~hf_collapse.report.CollapseReport.record_budget_metric`).
        measure: ``(model, stage, report)`` records what is reported at each stage (on test data).
        compare: ``(original, final, report)`` records side-by-side measurements (generation speed).
        save: ``(model, report)`` saves a model with its card and report: called with the collapsed model as soon as
            the removal ends (what a failure later leaves), then with the final model.
        data_roles: the data's roles (:data:`hf_collapse.report.DATA_ROLES`), recorded before the first save.
        on_failure: called with the error when a step after the removal fails (to say how to resume), which is then
            raised.
        phase: ``what -> context manager`` around each step (the commands print each phase and its duration).
    """
    collapsed, report = remove()
    report.data_roles.update(data_roles or {})
    if save is not None:
        save(collapsed, report)
    try:
        final, stages = collapsed, [("original", original), ("after removal", collapsed)]
        if healing is not None and report.after.removed:
            healing = healing if isinstance(healing, Healing) else healing()
            with phase(f"healing ({healing.method})"):
                teacher = healing.teacher if healing.teacher is not None else original
                final = heal(
                    collapsed, teacher, healing.data, method=healing.method, args=healing.args, **healing.options
                )
                report.extra.update(heal=healing.method, **healing.extra)
                if healing.described:
                    report.data_roles["healing"] = healing.described
            if validation_metric is not None:
                with phase("measuring the healed model on the validation data"):
                    report.record_budget_metric("after healing", validation_metric(final))
            stages.append(("after healing", final))
        if measure is not None:
            for stage, model in stages:
                with phase(f"measuring the {stage if stage == 'original' else 'model ' + stage} on the test data"):
                    measure(model, stage, report)
        if compare is not None:
            with phase("comparing the original and the final model side by side"):
                compare(original, final, report)
        if save is not None:
            save(final, report)
    except Exception as error:
        if on_failure is not None:
            on_failure(error)
        raise
    return final, report

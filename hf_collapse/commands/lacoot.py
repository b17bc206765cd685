"""``hf-collapse lacoot``: fine-tune with the MSW penalty, score the blocks, collapse them under a metric budget, heal
the collapsed model if asked (distillation from the LaCoOT-trained full model, or LoRA), save.

The task is classification (metric: accuracy) or, for a causal LM, next-token prediction on text windows (metric:
held-out perplexity). Default: the real pretrained all-MiniLM-L6-v2 on topic classification of the ``chatterbot-corpus``
dialog lines, a few minutes on 2 CPU cores; ``--model smollm2`` (or any causal LM) makes it a causal-LM task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ..budget import BudgetArguments
from ..data.tasks import accuracy, prepare_task, resolve_task
from ..lacoot import LaCoOTArguments, LaCoOTTrainer
from ..metrics import perplexity
from ..pipeline import Healing, run_pipeline
from ..report import CollapseReport, describe_split
from . import COMMANDS
from .arguments import (
    JobArguments,
    at_least,
    check_healing,
    healing_help,
    parse_job_flags,
    seed_everything,
)
from .output import phase, print_collapse_summary, save_collapse, say

__all__ = [
    "DEFAULT_LACOOT_LM_TRAINING",
    "DEFAULT_LACOOT_TRAINING",
    "DEFAULT_PERPLEXITY_RATIO",
    "DEFAULT_TRAINING",
    "DESCRIPTION",
    "LaCoOTJobArguments",
    "default_lacoot_arguments",
    "lacoot_training_defaults",
    "main",
    "run_lacoot_job",
]

DESCRIPTION = COMMANDS["lacoot"]


#: The perplexity budget of ``hf-collapse lacoot`` on a causal LM when none is given: perplexity may grow by 25%.
DEFAULT_PERPLEXITY_RATIO = 1.25

#: Training settings of the embedded default runs (each about five minutes on 2 CPU cores); flags override them.
#: lr 2e-4: plain fine-tuning of MiniLM on dialog topics for 4 epochs reaches 0.72 accuracy, against 0.67 at 1e-4
#: (linear decay, measured here; seed noise is about 2 points on the 372 test lines).
DEFAULT_TRAINING: dict[str, Any] = dict(
    num_train_epochs=4,
    learning_rate=2e-4,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    warmup_steps=0.1,
    weight_decay=0.01,
    eval_strategy="epoch",
    save_strategy="no",
    logging_steps=10,
    report_to="none",
    seed=0,
)
#: λ = 0.1: on a pretrained transformer the per-block MSW of 64-token features is 5-10, so λ = 1 lets the
#: penalty dominate the task loss (accuracy 0.46 against 0.63 with λ = 0.1 after 4 epochs, measured here). λ ramped
#: up over the first half of training: the task is learnt before the blocks are bent towards identities, which keeps
#: full-depth accuracy and wins at half depth once healed (benchmarks/experiments/lacoot_quality.json).
DEFAULT_LACOOT_TRAINING: dict[str, Any] = {
    **DEFAULT_TRAINING,
    "output_dir": "outputs/lacoot",
    "msw_weight": 0.1,
    "msw_warmup_ratio": 0.5,
}
#: ``hf-collapse lacoot`` on a causal LM: a step budget rather than epochs (the BBC training text alone is thousands
#: of windows), a learning rate for full fine-tuning of a pretrained LM, and λ = 1e-4: on SmolLM2 the mean per-block
#: MSW of 64-token windows is in the hundreds to thousands, so λ = 0.1 would drown the next-token loss.
DEFAULT_LACOOT_LM_TRAINING: dict[str, Any] = dict(
    output_dir="outputs/lacoot",
    max_steps=200,
    learning_rate=5e-5,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    warmup_steps=0.1,
    eval_strategy="no",
    save_strategy="no",
    logging_steps=10,
    report_to="none",
    seed=0,
    msw_weight=1e-4,
)


@dataclass
class LaCoOTJobArguments(JobArguments, BudgetArguments):
    """How to collapse after LaCoOT training (the ``hf-collapse lacoot`` flags besides ``LaCoOTArguments``). Without a
    metric budget, the task's default: an accuracy drop of 0.05 (classification), a perplexity ratio of 1.25
    (causal LM)."""

    heal: str | None = field(
        default=None,
        metadata={"help": healing_help},  # distill: from the LaCoOT-trained full model
    )
    heal_epochs: float = field(default=1.0, metadata={"help": "Epochs of healing over the training data."})
    heal_max_steps: int = field(default=-1, metadata={"help": "Steps of healing (overrides --heal_epochs when > 0)."})
    calibration_batches: int = field(
        default=8,
        metadata={"help": "Batches of training data (of per_device_eval_batch_size) the blocks' MSW is scored on."},
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "Continue a run whose collapse, healing or measuring failed: its progress folder "
            "(<output_dir>/collapse_progress); the trained model saved in <output_dir>/trained is reused."
        },
    )

    def __post_init__(self):
        JobArguments.__post_init__(self)
        BudgetArguments.__post_init__(self)
        check_healing(self.heal)
        if not self.heal_epochs > 0:
            raise ValueError(f"--heal_epochs must be > 0, got {self.heal_epochs}")
        at_least("calibration_batches", self.calibration_batches, 1)
        if self.resume_from is not None and not Path(self.resume_from).is_dir():
            raise ValueError(
                f"--resume_from {self.resume_from!r}: no such folder (the progress folder of an interrupted run, "
                "<output_dir>/collapse_progress by default)"
            )

    def metric_budget(self, task: str) -> dict[str, float | None]:
        """The metric budget for ``task`` as :func:`hf_collapse.collapse` keywords: the flags given, else the
        default of the task (an accuracy drop of 0.05; a perplexity ratio of 1.25)."""
        if self.max_metric_delta is not None or self.max_metric_ratio is not None:
            return {"max_metric_delta": self.max_metric_delta, "max_metric_ratio": self.max_metric_ratio}
        if task == "causal_lm":
            return {"max_metric_ratio": DEFAULT_PERPLEXITY_RATIO}
        return {"max_metric_delta": 0.05}


def lacoot_training_defaults(task: str) -> dict[str, Any]:
    """The ``LaCoOTArguments`` defaults of ``hf-collapse lacoot`` for ``task`` (flags override them)."""
    return DEFAULT_LACOOT_LM_TRAINING if task == "causal_lm" else DEFAULT_LACOOT_TRAINING


def default_lacoot_arguments(**overrides: Any) -> LaCoOTArguments:
    """:data:`DEFAULT_LACOOT_TRAINING` as :class:`LaCoOTArguments`, with ``overrides``."""
    return LaCoOTArguments(**{**DEFAULT_LACOOT_TRAINING, **overrides})


def run_lacoot_job(job: LaCoOTJobArguments, args: LaCoOTArguments) -> tuple[Any, CollapseReport, dict[str, Any]]:
    """Fine-tune ``job.model`` on ``job.dataset`` with LaCoOT, collapse it and save everything in ``args.output_dir``.

    Three roles of data, kept apart: the training split trains the model and calibrates the blocks' MSW scores
    (``--calibration_batches`` of it); the validation split (the dataset's, else carved out of train) decides the
    budget; the test split is only reported, at every stage (original, after removal, after healing).

    Writes ``<output_dir>/trained`` (the LaCoOT-trained model, as soon as training ends), ``<output_dir>/collapsed``
    (the collapsed model with its card, loadable with ``from_pretrained`` / ``AutoCollapsedModel``, plus its
    tokenizer; saved before healing, then again healed) and ``<output_dir>/report`` (JSON, markdown, PNG). When
    collapsing, healing or measuring fails, ``--resume_from <output_dir>/collapse_progress`` goes on from the trained
    model without training again. Returns ``(collapsed_model, report, summary)``.
    """
    task = resolve_task(job.model, job.task)
    budget = job.metric_budget(task)
    seed_everything(args)
    output = Path(args.output_dir)
    trained, progress = output / "trained", Path(job.resume_from or output / "collapse_progress")
    with phase(f"loading {job.model} and {job.dataset}"):
        model, data, processor, collator = prepare_task(job.model, job.dataset, task=task, **job.task_kwargs())
        if job.resume_from:
            if not (trained / "config.json").is_file():
                raise ValueError(f"cannot resume: {trained} holds no trained model (the first run saves it there)")
            model = type(model).from_pretrained(trained)
    trainer = LaCoOTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=accuracy if task == "classification" else None,
    )
    unit = "examples" if task == "classification" else f"causal-LM windows of {job.max_length} tokens"
    if not job.resume_from:
        ramp = f" ramped up over {args.msw_warmup_ratio:.0%} of training" if args.msw_warmup_ratio else ""
        with phase(f"training with the LaCoOT penalty (λ = {args.msw_weight}{ramp}, {len(data['train'])} {unit})"):
            trainer.train()
        if trainer.is_world_process_zero():
            model.save_pretrained(trained)  # what training cost is kept, whatever fails next
        trainer.accelerator.wait_for_everyone()
    metric_name = "accuracy" if task == "classification" else "perplexity"

    def remove():
        with phase("scoring the blocks on training data, then removing them under the budget (validation data)"):
            scores = trainer.block_scores(max_batches=job.calibration_batches)
            collapse_kwargs = dict(
                scores=scores,
                num_units=job.num_units,
                flops_fraction=job.flops_fraction,
                latency_repeats=job.latency_repeats,
                progress_dir=progress,
                resume_from=job.resume_from,
                **budget,
            )
            if task == "classification":
                return trainer.collapse(**collapse_kwargs)
            return trainer.collapse(
                eval_fn=lambda m: _metric(trainer, m, data["validation"], task, metric_name),
                higher_is_better=False,
                metric_name=metric_name,
                **collapse_kwargs,
            )

    def measure(model, stage: str, report: CollapseReport) -> None:
        report.record(
            f"{report.metric_name} on {job.dataset}",
            stage,
            _metric(trainer, model, data["test"], task, report.metric_name),
            metric=report.metric_name,
            higher_is_better=report.higher_is_better,
            data=describe_split(data["test"]),
            seen_in_healing=True,
        )

    batches = min(job.calibration_batches, math.ceil(len(data["train"]) / args.per_device_eval_batch_size))
    hint = f"Continue without training again: --resume_from {progress} (the trained model in {trained} is reused)"
    final, report = run_pipeline(
        trainer.model,
        remove,
        healing=(lambda: _healing(trainer, job, args, data)) if job.heal is not None else None,
        validation_metric=lambda m: _metric(trainer, m, data["validation"], task, metric_name),
        measure=measure,
        save=lambda model, report: save_collapse(args.output_dir, model, processor, report, job, data),
        data_roles={
            "training": describe_split(data["train"]),
            "calibration": f"{describe_split(data['train'])} (its first {batches} batches of "
            f"{args.per_device_eval_batch_size}: the blocks' MSW)",
            "validation": describe_split(data["validation"]),
            "test": describe_split(data["test"]),
        },
        on_failure=lambda error: say(f"collapsing was done, but healing or measuring failed. {hint}"),
        phase=phase,
    )
    return final, report, report.summary()


def _metric(trainer: LaCoOTTrainer, model, dataset, task: str, metric_name: str) -> float:
    """``model``'s metric on ``dataset``: the trainer's evaluation (classification) or perplexity (causal LM)."""
    if task == "classification":
        return float(trainer.evaluate_model(model, dataset)[f"eval_{metric_name}"])
    return perplexity(model, DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size))


def _healing(trainer: LaCoOTTrainer, job: LaCoOTJobArguments, args, data) -> Healing:
    """The healing of --heal: on the training data, with the job's training arguments for --heal_epochs (or
    --heal_max_steps), the LaCoOT-trained full model as the teacher of distillation."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    settings = {k: v for k, v in args.to_dict().items() if k in names and not k.startswith("_")}
    settings.update(
        output_dir=str(Path(args.output_dir) / "healing"),
        num_train_epochs=job.heal_epochs,
        max_steps=job.heal_max_steps,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
    )
    extra: dict[str, Any] = {"heal_epochs": job.heal_epochs}
    if job.heal_max_steps > 0:
        extra["heal_max_steps"] = job.heal_max_steps
    return Healing(
        job.heal,
        data["train"],
        teacher=trainer.model,
        args=TrainingArguments(**settings),
        options={"data_collator": trainer.data_collator},
        described=describe_split(data["train"]),
        extra=extra,
    )


def main(argv: Sequence[str]) -> int:
    """``hf-collapse lacoot [job flags] [LaCoOTArguments flags]``."""
    job, args = parse_job_flags(
        "hf-collapse lacoot",
        DESCRIPTION,
        LaCoOTJobArguments,
        LaCoOTArguments,
        DEFAULT_LACOOT_TRAINING,
        argv,
        # a causal LM trains on text windows with a much smaller λ
        defaults_for_job=lambda job: lacoot_training_defaults(resolve_task(job.model, job.task)),
    )
    _, report, _ = run_lacoot_job(job, args)
    print_collapse_summary(report, job.model, job.dataset, f"λ = {args.msw_weight}", args.output_dir)
    return 0

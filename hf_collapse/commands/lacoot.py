"""``hf-collapse lacoot``: fine-tune with the MSW penalty, score the blocks, collapse them under a metric budget, heal
the collapsed model if asked (distillation from the LaCoOT-trained full model, or LoRA), save.

The task is classification (metric: accuracy) or, for a causal LM, next-token prediction on text windows (metric:
held-out perplexity). Default: the real pretrained all-MiniLM-L6-v2 on topic classification of the ``chatterbot-corpus``
dialog lines, a few minutes on 2 CPU cores; ``--model smollm2`` (or any causal LM) makes it a causal-LM task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.tasks import accuracy, prepare_task, resolve_task
from ..lacoot import LaCoOTArguments, LaCoOTTrainer
from ..report import CollapseReport
from . import COMMANDS
from .arguments import JobArguments, at_least, parse_job_flags, seed_everything
from .output import phase, print_collapse_summary, save_collapse

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

#: The healing methods of ``hf-collapse lacoot`` (training ones: the linear map is for decoder LMs, see prune).
LACOOT_HEALING = ("distill", "lora")

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
#: full-depth accuracy and wins at half depth once healed (benchmarks/bench_lacoot_quality.py).
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
class LaCoOTJobArguments(JobArguments):
    """How to collapse after LaCoOT training (the ``hf-collapse lacoot`` flags besides ``LaCoOTArguments``)."""

    max_metric_delta: float | None = field(
        default=None,
        metadata={
            "help": "Collapse while the metric stays within this of the trained model's: an accuracy drop "
            "(classification; default 0.05) or a perplexity rise (causal_lm)."
        },
    )
    max_metric_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Collapse while the metric stays within this factor of the trained model's (causal_lm default "
            f"{DEFAULT_PERPLEXITY_RATIO} when no other metric budget is given)."
        },
    )
    num_units: int | None = field(default=None, metadata={"help": "Remove at most this many blocks."})
    heal: str | None = field(
        default=None,
        metadata={
            "help": "Heal the collapsed model: distill (from the LaCoOT-trained full model: its logits on the training "
            "data) or lora (peft LoRA on the training loss, merged back)."
        },
    )
    heal_epochs: float = field(default=1.0, metadata={"help": "Epochs of healing over the training data."})
    heal_max_steps: int = field(default=-1, metadata={"help": "Steps of healing (overrides --heal_epochs when > 0)."})

    def __post_init__(self):
        super().__post_init__()
        at_least("max_metric_delta", self.max_metric_delta, 0)
        at_least("max_metric_ratio", self.max_metric_ratio, 1)
        at_least("num_units", self.num_units, 1)
        if self.heal is not None and self.heal not in LACOOT_HEALING:
            raise ValueError(f"--heal {self.heal!r}: expected one of {', '.join(LACOOT_HEALING)}")
        if not self.heal_epochs > 0:
            raise ValueError(f"--heal_epochs must be > 0, got {self.heal_epochs}")

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

    Writes ``<output_dir>/collapsed`` (the collapsed model, loadable with ``from_pretrained`` / ``AutoCollapsedModel``,
    plus its tokenizer) and ``<output_dir>/report`` (JSON, markdown, PNG). Returns ``(collapsed_model, report,
    summary)``.
    """
    task = resolve_task(job.model, job.task)
    budget = job.metric_budget(task)
    seed_everything(args)
    with phase(f"loading {job.model} and {job.dataset}"):
        model, data, processor, collator = prepare_task(job.model, job.dataset, task=task, **job.task_kwargs())
    trainer = LaCoOTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=accuracy if task == "classification" else None,
    )
    unit = "examples" if task == "classification" else f"causal-LM windows of {job.max_length} tokens"
    ramp = f" ramped up over {args.msw_warmup_ratio:.0%} of training" if args.msw_warmup_ratio else ""
    with phase(f"training with the LaCoOT penalty (λ = {args.msw_weight}{ramp}, {len(data['train'])} {unit})"):
        trainer.train()
    with phase("scoring the blocks, then removing them under the budget (evaluating and timing each state)"):
        if task == "classification":
            collapsed, report = trainer.collapse(num_units=job.num_units, latency_repeats=job.latency_repeats, **budget)
        else:
            collapsed, report = _collapse_causal_lm(trainer, data["test"], job, budget)
    if job.heal is not None and report.after.removed:
        with phase(f"healing ({job.heal}{' from the LaCoOT-trained model' if job.heal == 'distill' else ''})"):
            collapsed = _heal(trainer, collapsed, report, job, args, data, task)
    save_collapse(args.output_dir, collapsed, processor, report, job, data)
    return collapsed, report, report.summary()


def _heal(trainer: LaCoOTTrainer, collapsed, report: CollapseReport, job: LaCoOTJobArguments, args, data, task: str):
    """Heal ``collapsed`` on the training data (the LaCoOT-trained full model as the distillation teacher), evaluate
    it as the budget's metric was, and record it in ``report`` (``extra`` and ``evaluations``)."""
    import dataclasses
    from pathlib import Path

    from transformers import TrainingArguments

    from ..healing import heal
    from ..metrics import perplexity

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
    heal_args = TrainingArguments(**settings)
    teacher = trainer.model if job.heal == "distill" else None
    healed = heal(
        collapsed, teacher, data["train"], method=job.heal, args=heal_args, data_collator=trainer.data_collator
    )
    if task == "classification":
        metric = float(trainer.evaluate_model(healed)[f"eval_{report.metric_name}"])
    else:
        from torch.utils.data import DataLoader

        metric = perplexity(healed, DataLoader(data["test"], batch_size=trainer.args.per_device_eval_batch_size))
    report.extra.update(heal=job.heal, metric_after_healing=metric, heal_epochs=job.heal_epochs)
    if job.heal_max_steps > 0:
        report.extra["heal_max_steps"] = job.heal_max_steps
    stages = (("original", report.before.metric), ("after removal", report.after.metric), ("after healing", metric))
    for stage, value in stages:
        report.record(
            f"{report.metric_name} on {job.dataset}",
            stage,
            value,
            metric=report.metric_name,
            higher_is_better=report.higher_is_better,
            data=f"{job.dataset}, evaluation split",
            seen_in_healing=True,
        )
    return healed


def _collapse_causal_lm(trainer: LaCoOTTrainer, held_out, job: LaCoOTJobArguments, budget: dict[str, Any]):
    """Remove the blocks with the smallest MSW under a perplexity budget (the held-out windows' perplexity)."""
    from torch.utils.data import DataLoader

    from ..metrics import perplexity

    evaluation = DataLoader(held_out, batch_size=trainer.args.per_device_eval_batch_size)
    return trainer.collapse(
        num_units=job.num_units,
        latency_repeats=job.latency_repeats,
        eval_fn=lambda model: perplexity(model, evaluation),
        higher_is_better=False,
        metric_name="perplexity",
        **budget,
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

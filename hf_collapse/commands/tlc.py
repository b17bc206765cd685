"""``hf-collapse tlc``: fine-tune, then collapse activation layers with TLC and fuse the linear maps, save."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..budget import BudgetArguments
from ..data.tasks import accuracy, prepare_task, resolve_task
from ..pipeline import run_pipeline
from ..report import CollapseReport, describe_split
from ..tlc import TLCConfig, compress
from . import COMMANDS
from .arguments import JobArguments, at_least, parse_job_flags, seed_everything
from .lacoot import DEFAULT_TRAINING
from .output import phase, print_collapse_summary, save_collapse, say

__all__ = ["DEFAULT_TLC_TRAINING", "DESCRIPTION", "TLCJobArguments", "main", "run_tlc_job"]

logger = logging.getLogger(__name__)

DESCRIPTION = COMMANDS["tlc"]

DEFAULT_TLC_TRAINING: dict[str, Any] = {**DEFAULT_TRAINING, "output_dir": "outputs/tlc"}


@dataclass
class TLCJobArguments(JobArguments, BudgetArguments):
    """How TLC collapses the fine-tuned model (the ``hf-collapse tlc`` flags besides ``TrainingArguments``)."""

    num_units: int | None = field(default=3, metadata={"help": "Collapse at most this many activation layers."})
    calibration_batches: int = field(default=8, metadata={"help": "Batches for statistics and candidate ranking."})
    finetune_steps: int = field(default=20, metadata={"help": "Fine-tuning steps after each collapse."})
    no_fuse: bool = field(default=False, metadata={"help": "Linearize without fusing the adjacent maps."})
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "Continue an interrupted run from its progress folder (<output_dir>/tlc_progress by default)."
        },
    )

    def __post_init__(self):
        JobArguments.__post_init__(self)
        if self.task == "causal_lm":
            raise ValueError(
                "--task causal_lm: hf-collapse tlc runs classification tasks (for a causal LM, use "
                "hf-collapse lacoot or hf-collapse prune)"
            )
        BudgetArguments.__post_init__(self)
        at_least("calibration_batches", self.calibration_batches, 1)
        at_least("finetune_steps", self.finetune_steps, 0)
        if self.resume_from is not None and not Path(self.resume_from).is_dir():
            raise ValueError(
                f"--resume_from {self.resume_from!r}: no such folder (the progress folder of an "
                "interrupted run, <output_dir>/tlc_progress by default)"
            )


def run_tlc_job(job: TLCJobArguments, args) -> tuple[Any, CollapseReport, dict[str, Any]]:
    """Fine-tune ``job.model`` on ``job.dataset`` (plain ``Trainer``), collapse activation layers with TLC, and
    save the compressed model with its card (``AutoCollapsedModel`` reloads it) and the report in
    ``args.output_dir``.

    Three roles of data, kept apart: the training split fine-tunes and calibrates (TLC's statistics and candidate
    ranking); the validation split (the dataset's, else carved out of train) decides the budget; the test split is
    only reported (the fine-tuned and the compressed model)."""
    from transformers import Trainer

    from ..evaluation import evaluate_model

    if resolve_task(job.model, job.task) != "classification":
        raise ValueError(
            f"{job.model} is a causal LM: hf-collapse tlc runs classification tasks (for a causal LM, "
            "use hf-collapse lacoot or hf-collapse prune)"
        )
    seed_everything(args)
    with phase(f"loading {job.model} and {job.dataset}"):
        model, data, processor, collator = prepare_task(
            job.model, job.dataset, task="classification", **job.task_kwargs()
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=accuracy,
    )
    # TLC starts from the fine-tuned model as saved in `finetuned`, in the first run and in a resumed one alike.
    finetuned = Path(args.output_dir) / "finetuned"
    if job.resume_from is None:
        with phase(f"fine-tuning ({len(data['train'])} examples)"):
            trainer.train()
        if trainer.is_world_process_zero():
            model.save_pretrained(finetuned)
        trainer.accelerator.wait_for_everyone()
    elif not (finetuned / "config.json").is_file():
        raise ValueError(f"cannot resume: {finetuned} holds no fine-tuned model (the first run saves it there)")
    else:
        logger.info("resuming TLC from %s, starting from the fine-tuned model in %s", job.resume_from, finetuned)
    model = type(model).from_pretrained(finetuned)
    config = TLCConfig(
        **job.limits(),
        calibration_batches=job.calibration_batches,
        finetune_steps=job.finetune_steps,
        fuse=not job.no_fuse,
    )

    def remove():
        with phase("collapsing activation layers with TLC (ranking, linearizing, fine-tuning, timing each step)"):
            return compress(
                model,
                config,
                data["train"],
                data["validation"],
                args,
                data_collator=collator,
                compute_metrics=accuracy,
                resume_from=job.resume_from,
            )

    def measure(measured, stage: str, report: CollapseReport) -> None:
        metrics = evaluate_model(measured, args, data["test"], data_collator=collator, compute_metrics=accuracy)
        report.record(
            f"accuracy on {job.dataset}",
            stage,
            metrics["eval_accuracy"],
            metric="accuracy",
            higher_is_better=True,
            data=describe_split(data["test"]),
            seen_in_healing=True,
        )

    training = describe_split(data["train"])
    progress = Path(job.resume_from or Path(args.output_dir) / "tlc_progress")
    compressed, report = run_pipeline(
        model,
        remove,
        measure=measure,
        save=lambda saved, report: save_collapse(args.output_dir, saved, processor, report, job, data),
        data_roles={
            "training": f"{training} (and the fine-tuning after each step)",
            "calibration": f"{training} (its first {config.calibration_batches} batches: statistics, ranking)",
            "validation": describe_split(data["validation"]),
            "test": describe_split(data["test"]),
        },
        on_failure=lambda error: say(f"measuring failed after TLC; continue with --resume_from {progress}"),
        phase=phase,
    )
    return compressed, report, report.summary()


def main(argv: Sequence[str]) -> int:
    """``hf-collapse tlc [job flags] [TrainingArguments flags]``."""
    from transformers import TrainingArguments

    job, args = parse_job_flags(
        "hf-collapse tlc", DESCRIPTION, TLCJobArguments, TrainingArguments, DEFAULT_TLC_TRAINING, argv
    )
    _, report, _ = run_tlc_job(job, args)
    print_collapse_summary(
        report, job.model, job.dataset, f"{job.finetune_steps} fine-tuning steps per layer", args.output_dir
    )
    return 0

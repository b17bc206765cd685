"""``hf-collapse trady``: memory-budgeted fine-tuning of a causal LM (or a classifier) with TraDy in one command.

Builds the task from the dataset (a causal LM on text windows, or a classifier on a labelled dataset), wraps the
model's linear layers in a TraDy adapter under a budget (a ratio of the cost of every channel, or bytes), calibrates
it on the first training batches, trains it with a plain ``Trainer``, measures the peak memory of a training step
(TraDy's and, for comparison, full fine-tuning's), and saves the adapter, the merged model on request and the
memory report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.tasks import TASKS, prepare_task, resolve_task
from ..report import describe_split, roles_markdown
from . import COMMANDS
from .arguments import LMJobArguments, at_least, parse_job_flags, seed_everything
from .output import phase, say_on_failure

__all__ = ["DEFAULT_TRADY_TRAINING", "DESCRIPTION", "TraDyJobArguments", "main", "memory_markdown", "run_trady_job"]

DESCRIPTION = COMMANDS["trady"]

logger = logging.getLogger(__name__)

#: TrainingArguments of the command; flags override them. TraDy's sparse channel updates need about ten times the
#: learning rate of full fine-tuning (see the TraDy docs): 5e-4 with AdamW, where full fine-tuning of a small LM
#: would take 5e-5.
DEFAULT_TRADY_TRAINING: dict[str, Any] = dict(
    output_dir="outputs/trady",
    max_steps=50,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    learning_rate=5e-4,
    warmup_steps=0.1,
    optim="adamw_torch",
    save_strategy="no",
    logging_steps=10,
    report_to="none",
    seed=0,
)


@dataclass
class TraDyJobArguments(LMJobArguments):
    """The ``hf-collapse trady`` flags besides ``TrainingArguments``."""

    task: str = field(
        default="auto",
        metadata={
            "help": "causal_lm (next-token prediction on text windows), classification (a head on labelled data) or "
            "auto (causal_lm when the model is a causal LM)."
        },
    )
    label_column: str = field(default="label", metadata={"help": "Label column (classification)."})
    budget_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Budget as a fraction of the cost of updating every channel of every target layer (e.g. 0.05)."
        },
    )
    budget_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Budget in bytes: weight-gradient plus activation bytes per sample of the selected channels."
        },
    )
    peak_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Budget on the measured peak of one whole training step (bytes, on this batch shape): TraDy "
            "chooses the channels, the depth and gradient checkpointing to stay under it, and refuses when it cannot "
            "(a --budget_ratio / --budget_bytes given too is the most channel budget it may take)."
        },
    )
    selection: str = field(
        default="static_top_rgn",
        metadata={
            "help": "Channel selection: a registered strategy (hf_collapse.trady.SELECTIONS); TraDyConfig's default."
        },
    )
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names or suffixes to target (default: every linear but the LM head)."
        },
    )
    max_depth: int | None = field(
        default=None,
        metadata={"help": "Only the last max_depth target layers may be selected (backpropagation stops there)."},
    )
    calibration_batches: int = field(default=4, metadata={"help": "Training batches for the a priori ranking."})
    max_length: int = field(
        default=128, metadata={"help": "causal_lm: tokens per window; classification: the most tokens of an example."}
    )
    train_windows: int | None = field(
        default=None,
        metadata={"help": "causal_lm: at most this many training windows (default: all of the training text)."},
    )
    eval_windows: int = field(default=32, metadata={"help": "causal_lm: test windows for perplexity (reported only)."})
    merge: bool = field(
        default=False,
        metadata={"help": "Also save the merged model (OUT/merged), reloadable with plain from_pretrained."},
    )
    compare_full: bool = field(
        default=True,
        metadata={"help": "Also measure the peak step memory of full fine-tuning (same batch, AdamW) for comparison."},
    )

    def __post_init__(self):
        super().__post_init__()
        from ..trady.config import SELECTIONS

        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"--selection {self.selection!r}: expected one of {', '.join(SELECTIONS.names())}")
        if self.budget_ratio is None and self.budget_bytes is None and self.peak_bytes is None:
            raise ValueError(
                "no budget: pass --budget_ratio (a fraction of every channel's cost, e.g. 0.05), --budget_bytes, or "
                "--peak_bytes (the whole training step's peak)"
            )
        if self.budget_ratio is not None and self.budget_bytes is not None:
            raise ValueError("two budgets: pass --budget_ratio or --budget_bytes, not both")
        if self.budget_ratio is not None and not 0 < self.budget_ratio <= 1:
            raise ValueError(f"--budget_ratio must be in (0, 1], got {self.budget_ratio:g}")
        at_least("budget_bytes", self.budget_bytes, 1)
        at_least("peak_bytes", self.peak_bytes, 1)
        at_least("max_depth", self.max_depth, 1)
        for name in ("calibration_batches", "max_length", "eval_windows"):
            at_least(name, getattr(self, name), 1)
        at_least("train_windows", self.train_windows, 1)
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2, got {self.max_length}")

    def targets(self) -> list[str] | None:
        if self.target_modules is None:
            return None
        names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
        return names or None


def _prepare(job: TraDyJobArguments, task: str):
    """``(model, train dataset, held-out dataset, processor, collator)`` for the task (:func:`prepare_task`)."""
    model, data, processor, collator = prepare_task(
        job.model,
        job.dataset,
        task=task,
        text_column=job.text_column,
        label_column=job.label_column,
        max_length=job.max_length,
        eval_windows=job.eval_windows,
        train_windows=job.train_windows,
    )
    if (
        task == "classification"
        and getattr(model.config, "pad_token_id", None) is None
        and getattr(processor, "pad_token_id", None) is not None
    ):
        model.config.pad_token_id = processor.pad_token_id  # decoder classifiers pool the last non-padding token
    return model, data["train"], data["test"], processor, collator


def _first_batch(dataset, collator, batch_size: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    return next(iter(DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)))


def _evaluate(model, dataset, collator, batch_size: int, task: str) -> float:
    """Held-out perplexity (causal LM) or accuracy (classification)."""
    import torch
    from torch.utils.data import DataLoader

    from ..metrics import perplexity, to_device

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    if task == "causal_lm":
        return float(perplexity(model, loader))
    device = next(model.parameters()).device
    correct = total = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
    model.train(was_training)
    return correct / max(total, 1)


def memory_markdown(summary: dict[str, Any]) -> str:
    """The markdown summary written next to ``memory_report.json``."""
    from ..profiling import StepMemory

    steps = {name: StepMemory(**data) for name, data in summary["step_memory"].items()}
    metric = summary["metric_name"]
    lines = [
        f"# TraDy fine-tuning of {summary['model']} on {summary['dataset']}",
        "",
        f"Budget: {summary['budget']} ({summary['budget_summary']['channels']} channels in "
        f"{summary['budget_summary']['layers_with_channels']} layers; "
        f"{summary['budget_summary']['budget_bytes']:,.0f} budget bytes, "
        f"{summary['budget_summary']['used_bytes']:,.0f} used). Trainable elements: "
        f"{summary['trainable_elements']:,} of {summary['total_elements']:,}.",
        "",
        *_plan_lines(summary.get("peak_plan"), steps["trady"]),
        f"Test {metric}: {summary['metric_before']:.4f} before, {summary['metric_after']:.4f} after "
        f"{summary['train_steps']} steps (test data: only reported; no decision was made on it).",
        "",
        roles_markdown(summary.get("data_roles", {})),
        "",
        f"## Peak memory of one training step (batch {summary['memory_batch_size']}, "
        f"{steps['trady'].optimizer}, {steps['trady'].device})",
        "",
        steps["trady"].to_markdown(references=steps),
        "",
    ]
    if "full" in steps:
        lines.append(f"TraDy's peak is {summary['peak_ratio_to_full']:.3f}x full fine-tuning's.")
    lines.append(
        f"Measured with {steps['trady'].measured_with}; activations and temporaries: the rest of the "
        "peak beyond parameters, gradients and optimizer state."
    )
    return "\n".join(lines) + "\n"


def _plan_lines(plan: dict[str, Any] | None, measured: Any) -> list[str]:
    """The peak budget, what it bought and the peak measured after calibration (``measured``), side by side."""
    if not plan:
        return []
    from ..trady.planning import PeakPlan, depth_text

    peak = PeakPlan.from_dict(plan)
    share = peak.budget_elements / peak.cap_elements
    return [
        "## Peak budget",
        "",
        "| peak budget | channel budget (elements) | depth | gradient checkpointing | peak measured when planned | "
        "peak measured before training |",
        "|---:|---:|---|---|---:|---:|",
        f"| {peak.peak_bytes / 2**20:,.1f} MiB | {peak.budget_elements:,.0f} ({share:.3g} of {peak.cap_elements:,.0f}) "
        f"| {depth_text(peak.max_depth)} | {'on' if peak.gradient_checkpointing else 'off'} | "
        f"{peak.measured_peak_bytes / 2**20:,.1f} MiB | {measured.peak_bytes / 2**20:,.1f} MiB |",
        "",
        f"{len(peak.trials)} plans were measured to choose it (AdamW, the training batch's shape).",
        "",
    ]


def _card_training(summary: dict[str, Any], args) -> str:
    """The card's account of a TraDy fine-tuning: budget, steps, the test metric, the memory measured."""
    text = (
        f"Fine-tuned with TraDy under the budget {summary['budget']} ({summary['budget_summary']['channels']} channels "
        f"in {summary['budget_summary']['layers_with_channels']} layers) for {summary['train_steps']} steps at "
        f"learning rate {args.learning_rate:g}. Test {summary['metric_name']}: {summary['metric_before']:.4f} before, "
        f"{summary['metric_after']:.4f} after (test data: only reported)."
    )
    if "peak_ratio_to_full" in summary:
        text += f" The peak memory of a training step was {summary['peak_ratio_to_full']:.3f}x full fine-tuning's."
    return text


def run_trady_job(job: TraDyJobArguments, args) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``job.model`` on ``job.dataset`` with TraDy and save, in ``args.output_dir``, the adapter
    (``adapter/``), the merged model if ``job.merge`` (``merged/``), ``memory_report.json`` and ``memory_report.md``.
    Returns ``(peft_model or merged model, summary)``."""
    import gc

    from peft import get_peft_model
    from transformers import Trainer

    from ..distributed import is_main_process
    from ..hub import save_with_card
    from ..profiling import step_memory
    from ..trady import TraDyCallback, TraDyConfig, calibrate, find_trady_model

    seed_everything(args)
    task = resolve_task(job.model, job.task)
    with phase(f"loading {job.model} and {job.dataset} ({task})"):
        model, train, held_out, processor, collator = _prepare(job, task)
    batch = _first_batch(train, collator, args.per_device_train_batch_size)
    metric_name = "perplexity" if task == "causal_lm" else "accuracy"
    summary: dict[str, Any] = {
        "model": job.model,
        "dataset": job.dataset,
        "task": task,
        "metric_name": metric_name,
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "memory_batch_size": int(next(iter(batch.values())).shape[0]),
        "step_memory": {},
    }
    training = describe_split(train)
    summary["data_roles"] = {
        "training": training,
        "calibration": f"{training} (its first {job.calibration_batches} batches: TraDy's a priori ranking)",
        "test": describe_split(held_out),
    }
    with phase(f"test {metric_name} before fine-tuning"):
        summary["metric_before"] = _evaluate(model, held_out, collator, args.per_device_eval_batch_size, task)
    if job.compare_full:
        with phase("peak memory of a full fine-tuning step (for comparison)"):
            summary["step_memory"]["full"] = step_memory(model, batch, method="full").to_dict()
            gc.collect()
    config = TraDyConfig(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS",
        budget_ratio=job.budget_ratio,
        budget_bytes=job.budget_bytes,
        peak_bytes=job.peak_bytes,
        selection=job.selection,
        target_modules=job.targets(),
        max_depth=job.max_depth,
        calibration_batches=job.calibration_batches,
        seed=args.seed,
    )
    peft_model = get_peft_model(model, config)
    with phase(f"calibrating TraDy on {job.calibration_batches} training batches"):
        from torch.utils.data import DataLoader

        calibration = calibrate(
            peft_model,
            DataLoader(train, batch_size=args.per_device_train_batch_size, collate_fn=collator, shuffle=False),
        )
    tuner = find_trady_model(peft_model)
    with phase("peak memory of a TraDy step"):
        summary["step_memory"]["trady"] = step_memory(peft_model, batch, method="trady").to_dict()
    budget = tuner.budget_summary()
    if config.peak_plan:
        summary["peak_plan"] = config.peak_plan
        summary["peak_met"] = summary["step_memory"]["trady"]["peak_bytes"] <= config.peak_plan["peak_bytes"]
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=train, data_collator=collator, callbacks=[TraDyCallback()]
    )
    with phase("fine-tuning"):
        result = trainer.train()
    output = Path(args.output_dir)
    if is_main_process():  # what training cost is kept before anything else can fail
        peft_model.save_pretrained(output / "adapter")
    with say_on_failure(f"fine-tuning was done and the adapter is saved in {output / 'adapter'}; measuring failed"):
        with phase(f"test {metric_name} after fine-tuning"):
            summary["metric_after"] = _evaluate(peft_model, held_out, collator, args.per_device_eval_batch_size, task)
    summary.update(
        budget=config.budget_description,
        budget_summary={k: v for k, v in budget.items() if k != "pool_layers"},
        selected_layers=calibration["selected_layers"],
        train_steps=int(result.global_step),
        train_loss=float(result.training_loss),
        trainable_elements=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        total_elements=sum(p.numel() for p in peft_model.parameters()),
        learning_rate=args.learning_rate,
        optimizer=str(args.optim),
    )
    steps = summary["step_memory"]
    if "full" in steps:
        summary["peak_ratio_to_full"] = steps["trady"]["peak_bytes"] / steps["full"]["peak_bytes"]
    final: Any = peft_model
    if is_main_process():
        with phase(f"saving to {output}"):
            output.mkdir(parents=True, exist_ok=True)
            save_with_card(
                peft_model,
                output / "adapter",
                processor=processor,
                data_roles=summary["data_roles"],
                training=_card_training(summary, args),
            )
            if job.merge:
                final = peft_model.merge_and_unload()
                final.save_pretrained(output / "merged")
                if processor is not None:
                    processor.save_pretrained(output / "merged")
            summary["saved"] = {
                "adapter": str(output / "adapter"),
                **({"merged": str(output / "merged")} if job.merge else {}),
            }
            (output / "memory_report.json").write_text(json.dumps(summary, indent=2, default=str))
            (output / "memory_report.md").write_text(memory_markdown(summary))
    return final, summary


def main(argv: Sequence[str]) -> int:
    """``hf-collapse trady [job flags] [TrainingArguments flags]``: memory-budgeted fine-tuning with TraDy."""
    from transformers import TrainingArguments

    job, args = parse_job_flags(
        "hf-collapse trady", DESCRIPTION, TraDyJobArguments, TrainingArguments, DEFAULT_TRADY_TRAINING, argv
    )
    _, summary = run_trady_job(job, args)
    print(
        f"\nTraDy on {job.model} / {job.dataset} ({summary['task']}; budget {summary['budget']}; "
        f"{summary['train_steps']} steps, lr {args.learning_rate:g})\n"
    )
    print(memory_markdown(summary))
    print(f"test {summary['metric_name']}: {summary['metric_before']:.4f} -> {summary['metric_after']:.4f}")
    saved = ", ".join(f"{path} ({what})" for what, path in summary.get("saved", {}).items())
    print(f"saved: {saved}, {args.output_dir}/memory_report.json, {args.output_dir}/memory_report.md")
    return 0

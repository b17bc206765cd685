"""What the commands print: each phase and its duration between the progress bars, and the summary of a collapse."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from ..report import CollapseReport, describe_speedup, format_count

__all__ = ["phase", "print_collapse_summary", "save_collapse", "say", "say_on_failure"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def say(message: str) -> None:
    """One line on stderr (main process only): what a user must know beside the progress bars."""
    if is_main_process():
        print(f"hf-collapse: {message}", file=sys.stderr, flush=True)


@contextmanager
def say_on_failure(message: str) -> Iterator[None]:
    """Say ``message`` (what was saved, how to go on) when the block fails, then let the error through."""
    try:
        yield
    except Exception:
        say(message)
        raise


@contextmanager
def phase(what: str) -> Iterator[None]:
    """Say on stderr (main process only) what a long job is doing, then how long it took: the phases show between
    the progress bars, which carry the estimates."""
    start = time.perf_counter()
    if is_main_process():
        print(f"hf-collapse: {what} ...", file=sys.stderr, flush=True)
    yield
    if is_main_process():
        print(f"hf-collapse: {what}: done in {_duration(time.perf_counter() - start)}", file=sys.stderr, flush=True)


def save_collapse(output_dir: str, model, processor, report: CollapseReport, job: Any, data: Any) -> None:
    """On the main process, save the collapsed model with its card and processor (``<output_dir>/collapsed``) and the
    report (``<output_dir>/report``), the report recording the job's model and dataset and the size of its splits."""
    from ..hub import save_with_card

    if not is_main_process():
        return
    output = Path(output_dir)
    with phase(f"saving to {output}"):
        report.extra.update(
            {
                "model": job.model,
                "dataset": job.dataset,
                **{f"{split}_examples": len(data[split]) for split in ("train", "validation", "test") if split in data},
            }
        )
        save_with_card(model, output / "collapsed", report, processor=processor)
        report.save(output / "report")


def print_collapse_summary(report: CollapseReport, model: str, dataset: str, setting: str, output_dir: str) -> None:
    """The report's table and a one-paragraph summary: what was removed, what it cost on the data that decided, and
    the saved model's result on test data (the card's headline), then where it was saved."""
    summary = report.summary()
    print(f"\n{report.method} on {model} / {dataset} ({setting})\n")
    print(report.to_markdown())
    budget = report.budget_evaluation()
    print(
        f"\nremoved {summary['removed']} {report.unit_name}: "
        f"{report.metric_name} {summary['metric_before']:.4f} -> {summary['metric_after']:.4f} (validation), "
        f"parameters {format_count(summary['params_before'])} -> {format_count(summary['params_after'])}, "
        f"FLOPs x{summary['flops_ratio']:.2f} fewer"
        + (f", latency {describe_speedup(summary)}" if summary["latency_speedup"] else "")
    )
    if budget is not None and "after healing" in budget.values:
        print(f"{report.metric_name} after healing ({report.extra.get('heal')}): {budget.values['after healing']:.4f}")
    if report.budget_met is False:
        print(report.budget_sentence().replace("**", ""))
    headline = report.headline()
    if headline is not None and headline.role == "test" and headline.final_stage is not None:
        print(
            f"saved model ({headline.final_stage}) on test data: {headline.name} "
            f"{headline.values['original']:.4f} -> {headline.values[headline.final_stage]:.4f}"
        )
    extra = report.extra
    if "tokens_per_s_before" in extra:
        print(
            f"generation: {extra['tokens_per_s_before']:.1f} -> {extra['tokens_per_s_after']:.1f} tokens/s "
            f"(x{extra['generation_speedup']:.2f}, KV cache)"
        )
    print(f"saved: {output_dir}/collapsed (model and card), {output_dir}/report (report.json, report.md, tradeoff.png)")

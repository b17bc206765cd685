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

__all__ = ["phase", "print_collapse_summary", "save_collapse"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


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
    """On the main process, save the collapsed model (``<output_dir>/collapsed``, with its processor) and the report
    (``<output_dir>/report``), the report recording the job's model and dataset and the size of its splits."""
    if not is_main_process():
        return
    output = Path(output_dir)
    with phase(f"saving to {output}"):
        report.extra.update(
            {
                "model": job.model,
                "dataset": job.dataset,
                "train_examples": len(data["train"]),
                "eval_examples": len(data["test"]),
            }
        )
        model.save_pretrained(output / "collapsed")
        if processor is not None:
            processor.save_pretrained(output / "collapsed")
        report.save(output / "report")


def print_collapse_summary(report: CollapseReport, model: str, dataset: str, setting: str, output_dir: str) -> None:
    """The report's table and a one-paragraph summary of what was removed, what it cost and where it was saved."""
    summary = report.summary()
    print(f"\n{report.method} on {model} / {dataset} ({setting})\n")
    print(report.to_markdown())
    print(
        f"\nremoved {summary['removed']} {report.unit_name}: "
        f"{report.metric_name} {summary['metric_before']:.4f} -> {summary['metric_after']:.4f}, "
        f"parameters {format_count(summary['params_before'])} -> {format_count(summary['params_after'])}, "
        f"FLOPs x{summary['flops_ratio']:.2f} fewer"
        + (f", latency {describe_speedup(summary)}" if summary["latency_speedup"] else "")
    )
    extra = report.extra
    if "perplexity_after_healing" in extra:
        print(f"perplexity after healing ({extra['heal']}): {extra['perplexity_after_healing']:.4f}")
    elif "metric_after_healing" in extra:
        print(f"{report.metric_name} after healing ({extra['heal']}): {extra['metric_after_healing']:.4f}")
    if "tokens_per_s_before" in extra:
        print(
            f"generation: {extra['tokens_per_s_before']:.1f} -> {extra['tokens_per_s_after']:.1f} tokens/s "
            f"(x{extra['generation_speedup']:.2f}, KV cache)"
        )
    print(f"saved: {output_dir}/collapsed (model), {output_dir}/report (report.json, report.md, tradeoff.png)")

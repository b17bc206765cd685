"""Does removing blocks from a real pretrained model cut its measured latency in proportion to its FLOPs?

The real all-MiniLM-L6-v2 (the embedded ``minilm``), scored with ShortGPT's block influence on real dialog lines
(the embedded ``dialog_topics``), collapsed by 1 .. ``blocks`` blocks with ``hf_collapse.collapse``. Every collapsed
state is timed side by side with the original in ``rounds`` interleaved rounds (what reports and model cards print),
on ``batch`` real tokenized lines padded to ``max_length``. Target (issue 2): a latency speed-up of at least 0.9x the
FLOPs ratio; the spread is the interquartile range of the per-round ratios.
"""

from __future__ import annotations

from pathlib import Path

VERSION = 1
TIMED = True
TARGET = 0.9


def run(s: dict) -> dict:
    import hf_collapse

    from .minilm import scored_minilm

    model, scores, inputs = scored_minilm(s["batch"], s["max_length"])
    _, report = hf_collapse.collapse(
        model,
        scores,
        num_units=s["blocks"],
        example_inputs=inputs,
        latency_repeats=s["rounds"],
        method="block_influence",
        progress=False,
    )
    rows = []
    for step in report.steps[1:]:
        flops_ratio = report.before.flops / step.flops
        rows.append(
            {
                "removed": step.removed,
                "unit": step.unit,
                "flops_ratio": round(flops_ratio, 3),
                "latency_ms": round(step.latency_s * 1e3, 2),
                "original_latency_ms": round(step.reference_latency_s * 1e3, 2),
                "speedup": round(step.latency_speedup, 3),
                "spread": [round(v, 3) for v in step.latency_spread],
                "speedup_over_flops_ratio": round(step.latency_speedup / flops_ratio, 3),
            }
        )
    return {"hardware": report.hardware, "rows": rows}


def smoke(s: dict) -> dict:
    return {**s, "blocks": 1, "rounds": 2, "batch": 2, "max_length": 16}


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    settings, result = results[0]
    lines = [
        f"| blocks removed | block | FLOPs ratio | speed-up ({result['hardware']}, batch {settings['batch']} x "
        f"{settings['max_length']}) | IQR | speed-up / FLOPs ratio |",
        "| ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['removed']} | `{r['unit']}` | {r['flops_ratio']:.2f} | {r['speedup']:.2f}x | "
            f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {r['speedup_over_flops_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    rows = results[0][1]["rows"]
    speedups = " / ".join(f"{r['speedup']:.2f}x" for r in rows)
    ratios = " / ".join(f"{r['flops_ratio']:.2f}" for r in rows)
    worst = min(r["speedup_over_flops_ratio"] for r in rows)
    return f"speed-up {speedups} for FLOPs ratios {ratios} (worst {worst:.3f} of the FLOPs ratio)"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    rows = results[0][1]["rows"]
    worst = min(r["speedup_over_flops_ratio"] for r in rows)
    verdict = "met" if worst >= TARGET else "missed"
    return (
        f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n{docs_table(experiment, results)}\n"
        f"Target: speed-up >= {TARGET}x the FLOPs ratio -> worst {worst:.3f} ({verdict}).\n"
    )

"""Does a collapse speed the model up where it is served? The real MiniLM, collapsed, timed in ONNX Runtime.

The real all-MiniLM-L6-v2 (the embedded ``minilm``), scored with ShortGPT's block influence on real dialog lines and
collapsed by 1 .. ``blocks`` blocks (as ``depth_speedup``: what LaCoOT's removal gives), and, as TLC collapses it,
with the 1 .. ``tlc_sites`` MLPs that keep the fewest ON neurons on those lines linearized and fused (each a rank-k
pair of linear maps; training-free here: TLC's fine-tuning changes weights, not shapes). Each state is exported with
``hf_collapse.export.export(..., format="onnx")`` (which checks the runtime's outputs against PyTorch's on two shapes)
and timed in ONNX Runtime on ``threads`` threads, side by side with the original's export in ``rounds`` interleaved
rounds, on ``batch`` real tokenized lines padded to ``max_length``. Target: a speed-up in the runtime of at least 0.9x
the FLOPs ratio; the spread is the interquartile range of the per-round ratios.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

VERSION = 1
TARGET = 0.9


def _tlc_states(model, inputs, count: int) -> dict:
    """``{"TLC k fused": model}``: the ``k`` MLPs with the fewest ON neurons on ``inputs`` linearized and fused."""
    from hf_collapse.tlc import activation_sites, activation_statistics, linearize

    stats = activation_statistics(model, [inputs], activation_sites(model))
    chosen = sorted(stats, key=lambda name: stats[name].neurons_on)[:count]
    states, current = {}, model
    for k, name in enumerate(chosen, start=1):
        site_stats = activation_statistics(current, [inputs], [s for s in activation_sites(current) if s.name == name])
        current = linearize(current, site_stats[name], fuse=True)
        states[f"TLC {k} fused"] = current
    return states


def _exported(states: dict, inputs: dict, feed: dict, threads: int, folder: Path) -> tuple[dict, dict]:
    """``({state: its ONNX Runtime runner}, {state: the largest difference from PyTorch that export() measured})``;
    a runner whose outputs differ from PyTorch's by more than 1e-4 of their scale on the timed inputs too is refused."""
    import numpy as np
    import torch

    from hf_collapse.export import EXPORTS, export

    runners, checks = {}, {}
    for name, state in states.items():
        out = folder / name.replace(" ", "_")
        checks[name] = export(state, out, format="onnx", repeats=1).max_abs_difference
        runners[name] = EXPORTS.get("onnx").runner(out, threads=threads)
        with torch.no_grad():
            expected = state(**inputs).last_hidden_state.numpy()
        if np.abs(runners[name](feed)[0] - expected).max() > 1e-4 * np.abs(expected).max():
            raise AssertionError(f"{name}: ONNX Runtime's outputs differ from PyTorch's on the timed inputs")
    return runners, checks


def run(s: dict) -> dict:
    import onnxruntime
    import torch

    import hf_collapse
    from hf_collapse.metrics import forward_flops, hardware_description

    from .minilm import scored_minilm
    from .timing import interleaved_seconds

    model, scores, inputs = scored_minilm(s["batch"], s["max_length"])
    order = sorted(scores, key=scores.get)
    feed = {k: v.numpy() for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    states = {"original": model}
    for k in range(1, s["blocks"] + 1):
        states[f"{k} removed"] = hf_collapse.remove_blocks(model, order[:k])
    states.update(_tlc_states(model, inputs, s["tlc_sites"]))
    flops = {name: forward_flops(state, inputs) for name, state in states.items()}
    with tempfile.TemporaryDirectory() as scratch:
        runners, checks = _exported(states, inputs, feed, s["threads"], Path(scratch))
        seconds = interleaved_seconds({name: lambda r=r: r(feed) for name, r in runners.items()}, s["rounds"])
    base = statistics.median(seconds["original"])
    rows = []
    for name in list(runners)[1:]:
        ratios = sorted(o / t for o, t in zip(seconds["original"], seconds[name]))
        speedup = base / statistics.median(seconds[name])
        flops_ratio = flops["original"] / flops[name]
        rows.append(
            {
                "state": name,
                "removed": order[: int(name.split()[0])] if name.endswith("removed") else [],
                "flops_ratio": round(flops_ratio, 3),
                "ort_ms": round(statistics.median(seconds[name]) * 1e3, 2),
                "original_ort_ms": round(base * 1e3, 2),
                "speedup": round(speedup, 3),
                "spread": [round(ratios[len(ratios) // 4], 3), round(ratios[(3 * len(ratios)) // 4], 3)],
                "speedup_over_flops_ratio": round(speedup / flops_ratio, 3),
                "max_abs_difference": checks[name],
            }
        )
    return {"onnxruntime": onnxruntime.__version__, "hardware": hardware_description(), "rows": rows}


def smoke(s: dict) -> dict:
    return {**s, "batch": 2, "max_length": 16, "rounds": 2, "blocks": 1, "tlc_sites": 1}


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    s, result = results[0]
    lines = [
        f"ONNX Runtime {result['onnxruntime']} (CPU provider, {s['threads']} thread(s)), batch {s['batch']} x "
        f"{s['max_length']} tokens of dialog lines, each state beside the original's export in {s['rounds']} "
        f"interleaved rounds; {result['hardware']}:",
        "",
        "| collapse | FLOPs ratio | ONNX Runtime ms | original ms | speed-up | spread (IQR) | speed-up / FLOPs ratio "
        "| largest difference from PyTorch |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in result["rows"]:
        what = ", ".join(n.split(".")[-1] for n in r["removed"]) or "fused MLPs"
        lines.append(
            f"| {r['state']} ({what}) | {r['flops_ratio']:.3f} | {r['ort_ms']:.2f} | {r['original_ort_ms']:.2f} | "
            f"{r['speedup']:.3f} | {r['spread'][0]:.3f}-{r['spread'][1]:.3f} | {r['speedup_over_flops_ratio']:.3f} | "
            f"{r['max_abs_difference']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def _at_most(x: float) -> str:
    """``x`` rounded up to one significant digit: ``4.8e-06`` -> ``5e-6``."""
    exponent = math.floor(math.log10(x))
    digit = math.ceil(x / 10**exponent - 1e-9)
    if digit == 10:
        digit, exponent = 1, exponent + 1
    return f"{digit}e{exponent}"


def _group(rows: list[dict], label: str) -> str:
    speedups = " / ".join(f"{r['speedup']:.2f}x" for r in rows)
    ratios = " / ".join(f"{r['flops_ratio']:.2f}" for r in rows)
    kept = " / ".join(f"{r['speedup_over_flops_ratio']:.3f}" for r in rows)
    return f"{label}: {speedups} for FLOPs ratios {ratios} ({kept} of them)"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    rows = results[0][1]["rows"]
    blocks = [r for r in rows if r["removed"]]
    fused = [r for r in rows if not r["removed"]]
    parts = [_group(group, label) for group, label in ((blocks, "blocks"), (fused, "TLC")) if group]
    misses = [
        f"{r['state']} misses {TARGET}x by {TARGET - r['speedup_over_flops_ratio']:.3f}" for r in rows if _missed(r)
    ]
    largest = max(r["max_abs_difference"] for r in rows)
    return "; ".join(parts + misses + [f"outputs within {_at_most(largest)} of PyTorch's"])


def _missed(row: dict) -> bool:
    return row["speedup_over_flops_ratio"] < TARGET


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    text = f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n"
    if not results:
        return text + "Not run yet.\n"
    rows = results[0][1]["rows"]
    worst = min(r["speedup_over_flops_ratio"] for r in rows)
    verdict = "missed" if any(_missed(r) for r in rows) else "met"
    return (
        f"{text}{docs_table(experiment, results)}\n"
        f"Target: speed-up >= {TARGET}x the FLOPs ratio -> worst {worst:.3f} ({verdict}).\n"
    )

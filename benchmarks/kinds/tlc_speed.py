"""Does fusing TLC-linearized MLPs cut latency in proportion to FLOPs?

A RoBERTa-shaped encoder, randomly initialised with ``seed`` (``layers``, ``hidden_size``, ``heads``,
``intermediate_size``: RoBERTa-base's in the experiment), with the MLPs of its first k layers linearized and fused by
``hf_collapse.tlc.linearize`` (statistics from the timed inputs) for every k of ``fused`` (0, the original, is the
baseline): parameters, forward FLOPs and latency, the states timed side by side in ``repeats`` interleaved rounds
(median) on ``batch`` random token sequences of ``max_length``. Target (issue 4): the latency ratio within 10% of
the FLOPs ratio (latency ratio / FLOPs ratio >= 0.9).
"""

from __future__ import annotations

import statistics
from pathlib import Path

VERSION = 1
TARGET = 0.9


def _states(s: dict) -> tuple[dict, dict]:
    """``({k: model with its first k MLPs linearized and fused}, inputs)`` for every k of ``fused`` and 0."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    from hf_collapse import metrics
    from hf_collapse.tlc import activation_sites, activation_statistics, linearize

    torch.manual_seed(s["seed"])
    config = RobertaConfig(
        num_hidden_layers=s["layers"],
        hidden_size=s["hidden_size"],
        num_attention_heads=s["heads"],
        intermediate_size=s["intermediate_size"],
    )
    base = RobertaModel(config, add_pooling_layer=False).eval()
    inputs = metrics.example_inputs(base, batch_size=s["batch"], seq_len=s["max_length"])
    sites = activation_sites(base)
    stats = activation_statistics(base, [inputs], sites)
    states, current = {0: base}, base
    for k in range(1, max(s["fused"]) + 1):
        current = linearize(current, stats[sites[k - 1].name])
        if k in s["fused"]:
            states[k] = current
    return {k: states[k] for k in sorted({0, *s["fused"]})}, inputs


def run(s: dict) -> dict:
    import torch

    from hf_collapse import metrics

    from .timing import interleaved_seconds

    states, inputs = _states(s)
    with torch.inference_mode():
        seconds = interleaved_seconds({k: lambda m=m: m(**inputs) for k, m in states.items()}, s["repeats"])
    flops0, latency0 = metrics.forward_flops(states[0], inputs), statistics.median(seconds[0])
    rows = []
    for k, model in states.items():
        flops, latency = metrics.forward_flops(model, inputs), statistics.median(seconds[k])
        rows.append(
            {
                "mlps_fused": k,
                "params": metrics.count_parameters(model),
                "flops": flops,
                "latency_s": round(latency, 4),
                "flops_ratio": round(flops0 / flops, 3),
                "latency_ratio": round(latency0 / latency, 3),
                "latency_over_flops_ratio": round((latency0 / latency) / (flops0 / flops), 3),
            }
        )
    return {"hardware": metrics.hardware_description(), "rows": rows}


def smoke(s: dict) -> dict:
    return {
        **s,
        "layers": 2,
        "hidden_size": 64,
        "heads": 2,
        "intermediate_size": 256,
        "fused": [0, 1, 2],
        "batch": 2,
        "max_length": 16,
        "repeats": 2,
    }


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    settings, result = results[0]
    lines = [
        f"| MLPs fused | params | GFLOPs | latency ms ({result['hardware']}, batch {settings['batch']} x "
        f"{settings['max_length']}) | FLOPs ratio | latency ratio | latency ratio / FLOPs ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mlps_fused']} | {r['params']:,} | {r['flops'] / 1e9:.1f} | {r['latency_s'] * 1e3:.1f} | "
            f"{r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['latency_over_flops_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _fused_rows(results: list[tuple[dict, dict]]) -> list[dict]:
    return [r for r in results[0][1]["rows"] if r["mlps_fused"]]


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    ratios = " / ".join(f"{r['latency_over_flops_ratio']:.3f}" for r in _fused_rows(results))
    return f"latency ratio / FLOPs ratio {ratios}"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    text = f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n"
    if not results:
        return text + "Not run yet.\n"
    worst = min(r["latency_over_flops_ratio"] for r in _fused_rows(results))
    verdict = "met" if worst >= TARGET else "missed"
    return (
        f"{text}{docs_table(experiment, results)}\n"
        f"Target: latency ratio within 10% of the FLOPs ratio -> worst latency ratio / FLOPs ratio {worst:.3f} "
        f"({verdict}).\n"
    )

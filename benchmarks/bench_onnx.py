"""Does a collapse speed the model up where it is served? The real MiniLM, collapsed, timed in ONNX Runtime.

The real all-MiniLM-L6-v2 (the embedded ``minilm``), scored with ShortGPT's block influence on real dialog lines and
collapsed by 1, 2, 3 blocks (as ``depth_speedup.py``: what LaCoOT's removal gives), and, as TLC collapses it, with the
1, 2, 3 MLPs that keep the fewest ON neurons on those lines linearized and fused (each a rank-k pair of linear maps;
training-free here: TLC's fine-tuning changes weights, not shapes), each state exported with
``hf_collapse.export.export(...,
format="onnx")`` (which checks the runtime's outputs against PyTorch's on two shapes) and timed in ONNX Runtime on one
thread, side by side with the original's export in interleaved rounds, on a batch of real tokenized lines padded to
``--max_length``. Target: a speed-up in the runtime of at least 0.9x the FLOPs ratio.

    python benchmarks/bench_onnx.py [--batch 8 --max_length 128 --rounds 30 --blocks 3 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from minilm_dialog import scored_minilm

import hf_collapse
from hf_collapse.export import EXPORTS, export
from hf_collapse.metrics import forward_flops, hardware_description


def tlc_states(model, inputs, count: int) -> dict:
    """``{"TLC k fused": model}``: the ``k`` MLPs with the fewest ON neurons on ``inputs`` linearized and fused."""
    from hf_collapse.tlc import activation_sites, activation_statistics, linearize

    sites = activation_sites(model)
    stats = activation_statistics(model, [inputs], sites)
    chosen = sorted(stats, key=lambda name: stats[name].neurons_on)[:count]
    states, current = {}, model
    for k, name in enumerate(chosen, start=1):
        site_stats = activation_statistics(current, [inputs], [s for s in activation_sites(current) if s.name == name])
        current = linearize(current, site_stats[name], fuse=True)
        states[f"TLC {k} fused"] = current
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--tlc_sites", type=int, default=3, help="MLPs linearized and fused (TLC), cumulatively")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_onnx"))
    args = parser.parse_args()

    model, scores, inputs = scored_minilm(args.batch, args.max_length)
    order = sorted(scores, key=scores.get)
    feed = {k: v.numpy() for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    onnx = EXPORTS.get("onnx")
    with tempfile.TemporaryDirectory() as scratch:
        states = {"original": model}
        for k in range(1, args.blocks + 1):
            states[f"{k} removed"] = hf_collapse.remove_blocks(model, order[:k])
        states.update(tlc_states(model, inputs, args.tlc_sites))
        runners, checks, flops = {}, {}, {}
        for name, state in states.items():
            out = Path(scratch) / name.replace(" ", "_")
            report = export(state, out, format="onnx", repeats=1)
            checks[name] = report.max_abs_difference
            runners[name] = onnx.runner(out, threads=args.threads)
            with torch.no_grad():
                expected = state(**inputs).last_hidden_state.numpy()
            assert np.abs(runners[name](feed)[0] - expected).max() <= 1e-4 * np.abs(expected).max()
            flops[name] = forward_flops(state, inputs)
        times = {name: [] for name in runners}
        for name in runners:
            runners[name](feed)  # warm-up
        for _ in range(args.rounds):  # interleaved: a slow moment of the machine hits every state alike
            for name, run in runners.items():
                start = time.perf_counter()
                run(feed)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["original"])
    rows = []
    for name in list(runners)[1:]:
        ratios = sorted(o / t for o, t in zip(times["original"], times[name]))
        speedup = base / statistics.median(times[name])
        flops_ratio = flops["original"] / flops[name]
        rows.append(
            {
                "state": name,
                "removed": order[: int(name.split()[0])] if name.endswith("removed") else [],
                "flops_ratio": round(flops_ratio, 3),
                "ort_ms": round(statistics.median(times[name]) * 1e3, 2),
                "original_ort_ms": round(base * 1e3, 2),
                "speedup": round(speedup, 3),
                "spread": [round(ratios[len(ratios) // 4], 3), round(ratios[(3 * len(ratios)) // 4], 3)],
                "speedup_over_flops_ratio": round(speedup / flops_ratio, 3),
                "max_abs_difference": checks[name],
            }
        )
    import onnxruntime

    header = (
        f"all-MiniLM-L6-v2 exported to ONNX and run by ONNX Runtime {onnxruntime.__version__} (CPU provider, "
        f"{args.threads} thread(s)); batch {args.batch} x {args.max_length} tokens of dialog lines; each state timed "
        f"beside the original's export in {args.rounds} interleaved rounds; {hardware_description()}"
    )
    lines_out = [
        header,
        "",
        "| collapse | FLOPs ratio | ONNX Runtime ms | original ms | speed-up | spread (IQR) | speed-up / FLOPs "
        "ratio | largest difference from PyTorch |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines_out.append(
            f"| {r['state']} ({', '.join(n.split('.')[-1] for n in r['removed']) or 'fused MLPs'}) | "
            f"{r['flops_ratio']:.3f} "
            f"| {r['ort_ms']:.2f} | {r['original_ort_ms']:.2f} | {r['speedup']:.3f} | {r['spread'][0]:.3f}-"
            f"{r['spread'][1]:.3f} | {r['speedup_over_flops_ratio']:.3f} | {r['max_abs_difference']:.2g} |"
        )
    worst = min(r["speedup_over_flops_ratio"] for r in rows)
    lines_out += [
        "",
        f"target: speed-up >= 0.9x the FLOPs ratio -> worst {worst:.3f} ({'met' if worst >= 0.9 else 'missed'})",
    ]
    text = "\n".join(lines_out) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".txt").write_text(text)
    Path(args.output + ".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Speed sanity of depth surgery: does removing blocks cut measured latency in proportion to FLOPs?

A RoBERTa-base-sized encoder (12 layers, hidden 768, random init) against the same model with every other
block removed (12 -> 6). Both are timed side by side in one run, interleaved, so machine noise hits both.
The target (issue 2) is a latency speed-up of at least 0.9x the FLOPs ratio.

    python benchmarks/depth_speedup.py [--batch 8 --seq-len 128 --repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaModel

import hf_collapse
from hf_collapse import metrics


def timed(model, inputs) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "depth_speedup.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    full = RobertaModel(RobertaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                      intermediate_size=3072), add_pooling_layer=False).eval()
    half = hf_collapse.remove_blocks(full, [f"encoder.layer.{i}" for i in range(1, 12, 2)])
    inputs = metrics.example_inputs(full, batch_size=args.batch, seq_len=args.seq_len)

    flops_full, flops_half = metrics.forward_flops(full, inputs), metrics.forward_flops(half, inputs)
    for _ in range(args.warmup):
        timed(full, inputs), timed(half, inputs)
    times_full, times_half = [], []
    for _ in range(args.repeats):  # interleaved: drift and noise affect both models alike
        times_full.append(timed(full, inputs))
        times_half.append(timed(half, inputs))
    latency_full, latency_half = statistics.median(times_full), statistics.median(times_half)

    flops_ratio = flops_full / flops_half
    speedup = latency_full / latency_half
    result = {
        "model": "RoBERTa-base-sized encoder, random init",
        "layers": [12, 6],
        "batch": args.batch,
        "seq_len": args.seq_len,
        "hardware": metrics.hardware_description(),
        "params": [metrics.count_parameters(full), metrics.count_parameters(half)],
        "flops": [flops_full, flops_half],
        "median_latency_s": [round(latency_full, 4), round(latency_half, 4)],
        "flops_ratio": round(flops_ratio, 3),
        "latency_speedup": round(speedup, 3),
        "speedup_over_flops_ratio": round(speedup / flops_ratio, 3),
        "target": ">= 0.9",
    }
    print(f"12 -> 6 layers on {result['hardware']}, batch {args.batch} x {args.seq_len} tokens")
    print(f"  FLOPs    {flops_full / 1e9:8.1f} G -> {flops_half / 1e9:8.1f} G   ratio {flops_ratio:.3f}x")
    print(f"  latency  {latency_full * 1e3:8.1f} ms -> {latency_half * 1e3:7.1f} ms   speed-up {speedup:.3f}x")
    print(f"  speed-up / FLOPs ratio = {speedup / flops_ratio:.3f} (target >= 0.9)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Does removing blocks from a real pretrained model cut its measured latency in proportion to its FLOPs?

The real all-MiniLM-L6-v2 (the embedded ``minilm``), scored with ShortGPT's block influence on real dialog lines
(the embedded ``dialog_topics``), collapsed by 1, 2, 3 blocks with ``hf_collapse.collapse``. Every collapsed state
is timed side by side with the original in interleaved rounds (what reports and model cards print), on a batch of
real tokenized lines padded to ``--max_length``. The target (issue 2) is a latency speed-up of at least 0.9x the FLOPs
ratio; the spread is the interquartile range of the per-round ratios.

    python benchmarks/depth_speedup.py [--batch 8 --max_length 128 --rounds 15 --blocks 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minilm_dialog import scored_minilm

import hf_collapse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "depth_speedup.json"))
    args = parser.parse_args()

    model, scores, inputs = scored_minilm(args.batch, args.max_length)
    _, report = hf_collapse.collapse(
        model,
        scores,
        num_units=args.blocks,
        example_inputs=inputs,
        latency_repeats=args.rounds,
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
    result = {
        "model": "all-MiniLM-L6-v2 (pretrained, embedded), scored by block influence on dialog_topics",
        "hardware": report.hardware,
        "batch": args.batch,
        "seq_len": args.max_length,
        "rounds": args.rounds,
        "rows": rows,
        "target": "speed-up >= 0.9x the FLOPs ratio",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"all-MiniLM-L6-v2, 6 blocks, on {report.hardware}; batch {args.batch} x {args.max_length} tokens; "
        f"each state timed side by side with the original, {args.rounds} interleaved rounds"
    )
    print(
        f"{'removed':>8} {'block':>16} {'FLOPs ratio':>12} {'speed-up':>9} {'spread (IQR)':>14} {'speed-up/FLOPs':>15}"
    )
    for r in rows:
        print(
            f"{r['removed']:>8} {r['unit']:>16} {r['flops_ratio']:>12.3f} {r['speedup']:>9.3f} "
            f"{r['spread'][0]:>6.3f}-{r['spread'][1]:<7.3f} {r['speedup_over_flops_ratio']:>15.3f}"
        )
    worst = min(r["speedup_over_flops_ratio"] for r in rows)
    print(f"target: speed-up >= 0.9x the FLOPs ratio -> worst {worst:.3f} ({'met' if worst >= 0.9 else 'missed'})")


if __name__ == "__main__":
    main()

"""TraDy under a budget on the whole training step (``TraDyConfig(peak_bytes=...)``) on a real decoder LM.

Task: SmolLM2-135M-Instruct (the embedded ``smollm2``, float32) on BBC News windows, batch ``--batch_size`` x
``--seq_len`` tokens, AdamW, as in ``bench_trady_llm.py``. Reference: the measured peak of one plain full fine-tuning
step (AdamW in float32, no checkpointing) on the first batch.

1. **The peak holds**: for peak budgets from the smallest TraDy can reach (the value its refusal names) to full
   fine-tuning's, calibration plans the channels, the depth and gradient checkpointing; the measured peak of a step
   is then checked for the first ``--draws`` draws of the run (each epoch re-samples the channels).
2. **What it costs in quality**: at ``--train_at`` (0.4) x full fine-tuning's peak, TraDy trains ``--steps`` steps;
   LoRA r=8 is given the same batch and gradient checkpointing; held-out loss on the test split of both.

    python benchmarks/bench_trady_peak.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_trady_llm import PROJECTIONS, held_out_loss, news_batches  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_collapse import compat  # noqa: E402
from hf_collapse.data import embedded_model_path  # noqa: E402
from hf_collapse.trady import TraDyConfig, calibrate, find_trady_model, step_memory  # noqa: E402
from hf_collapse.trady.planning import PeakBudgetError  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 2**20


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval_windows", type=int, default=16)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.6, 1.0], help="x full fine-tuning's peak")
    parser.add_argument("--train_at", type=float, default=0.4)
    parser.add_argument("--draws", type=int, default=3, help="draws (epochs) whose step peak is measured")
    parser.add_argument("--lr_trady", type=float, default=5e-4)
    parser.add_argument("--lr_lora", type=float, default=5e-4)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--calibration_batches", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_trady_peak"))
    return parser.parse_args()


def base_model():
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path("smollm2"), dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def trady_under(limit: int, calibration_batches):
    model = get_peft_model(
        base_model(), TraDyConfig(task_type="CAUSAL_LM", peak_bytes=limit, target_modules=PROJECTIONS)
    )
    start = time.perf_counter()
    summary = calibrate(model, calibration_batches)
    return model, summary, time.perf_counter() - start


def train(model, batches, lr: float) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()


def main() -> None:
    args = parse()
    hf_logging.set_verbosity_error()
    batches, evaluation = news_batches(args)
    calibration_batches = batches[: args.calibration_batches]

    full = step_memory(base_model(), batches[0], method="full").peak_bytes
    print(f"full fine-tuning step peak: {full / MIB:,.0f} MiB", flush=True)
    gc.collect()
    rows = []
    try:
        trady_under(int(0.05 * full), calibration_batches)
        raise SystemExit("a peak budget of 0.05x full fine-tuning's was met: the smallest feasible one is lower")
    except PeakBudgetError as refused:
        smallest = int(re.search(r"at least ([\d,]+)", str(refused)).group(1).replace(",", ""))
        print(f"refused at 0.05x: {refused}", flush=True)
    limits = [("smallest feasible", smallest)] + [(f"{share:g}x full", int(share * full)) for share in args.budgets]
    trained = {}
    for label, limit in limits:
        model, summary, seconds = trady_under(limit, calibration_batches)
        tuner = find_trady_model(model)
        plan = summary["peak_plan"]
        peaks = []
        for draw in range(args.draws):
            if draw:
                tuner.resample(draw)
            peaks.append(step_memory(model, batches[0]).peak_bytes)
        budget = tuner.budget_summary()
        row = dict(
            budget=label,
            peak_budget_bytes=limit,
            channel_budget_elements=plan["budget_elements"],
            channel_share=plan["budget_elements"] / plan["cap_elements"],
            max_depth=plan["max_depth"],
            gradient_checkpointing=plan["gradient_checkpointing"],
            channels=budget["channels"],
            layers_with_channels=budget["layers_with_channels"],
            plans_measured=len(plan["trials"]),
            planning_s=round(seconds, 1),
            measured_peaks=peaks,
            met=max(peaks) <= limit,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if label == f"{args.train_at:g}x full":
            tuner.resample(0)  # back to the first draw, as a run starts
            train(model, batches, args.lr_trady)
            trained["trady"] = dict(peak_bytes=max(peaks), held_out_loss=held_out_loss(model, evaluation), **row)
        del model, tuner
        gc.collect()

    lora = get_peft_model(
        base_model(),
        LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=PROJECTIONS),
    )
    lora_plain_peak = step_memory(lora, batches[0]).peak_bytes
    compat.set_activation_checkpointing(lora.base_model.model, True)
    lora.base_model.model.enable_input_require_grads()  # LoRA's layers sit in every block: the input must need grads
    lora_peak = step_memory(lora, batches[0]).peak_bytes
    train(lora, batches, args.lr_lora)
    trained["lora"] = dict(
        peak_bytes=lora_peak, plain_peak_bytes=lora_plain_peak, held_out_loss=held_out_loss(lora, evaluation)
    )

    lines = [
        f"SmolLM2-135M-Instruct on BBC News windows, batch {args.batch_size} x {args.seq_len} tokens, AdamW, "
        f"{'cuda' if torch.cuda.is_available() else f'cpu ({torch.get_num_threads()} threads)'}. Full fine-tuning's "
        f"step peak (float32, no checkpointing): {full / MIB:,.0f} MiB.",
        f"Peak of a step measured by hf_collapse.trady.step_memory for the first {args.draws} draws of each plan.",
        "",
        "| peak budget | MiB | channel budget (share of every channel) | depth | checkpointing | channels | "
        "plans measured | planning s | measured peaks, MiB | within |",
        "|---|---:|---:|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        depth = "any" if r["max_depth"] is None else f"last {r['max_depth']} projections"
        lines.append(
            f"| {r['budget']} | {r['peak_budget_bytes'] / MIB:,.0f} | {r['channel_budget_elements']:,.0f} "
            f"({r['channel_share']:.3f}) | {depth} | {'on' if r['gradient_checkpointing'] else 'off'} | "
            f"{r['channels']:,} | {r['plans_measured']} | "
            f"{r['planning_s']} | {' / '.join(f'{p / MIB:,.0f}' for p in r['measured_peaks'])} | "
            f"{'yes' if r['met'] else 'NO'} |"
        )
    verdicts = [
        f"peak within the budget for every budget and draw: {'met' if all(r['met'] for r in rows) else 'NOT met'}"
    ]
    if "trady" in trained:
        ratio = trained["trady"]["held_out_loss"] / trained["lora"]["held_out_loss"]
        verdicts.append(
            f"at {args.train_at:g}x full fine-tuning's peak ({trained['trady']['peak_bytes'] / MIB:,.0f} MiB): TraDy "
            f"held-out loss {trained['trady']['held_out_loss']:.4f} after {args.steps} steps, LoRA r={args.lora_r} "
            f"with checkpointing {trained['lora']['held_out_loss']:.4f} (peak {lora_peak / MIB:,.0f} MiB; "
            f"{lora_plain_peak / MIB:,.0f} without): ratio {ratio:.3f} (target <= 1.02): "
            f"{'met' if ratio <= 1.02 else 'NOT met'}"
        )
    text = "\n".join([*lines, "", *verdicts, ""])
    print("\n" + text)
    with open(args.out + ".txt", "w") as handle:
        handle.write(text)
    with open(args.out + ".json", "w") as handle:
        json.dump({"settings": vars(args), "full_peak_bytes": full, "rows": rows, "trained": trained}, handle, indent=2)


if __name__ == "__main__":
    main()

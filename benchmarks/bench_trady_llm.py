"""TraDy vs LoRA vs full fine-tuning of a real decoder LM, side by side in one run: peak step memory and held-out loss.

Task: SmolLM2-135M-Instruct (the embedded ``smollm2``: LlamaForCausalLM, 30 layers, float32) fine-tuned on BBC News
text cut into windows of ``--seq_len`` tokens (next-token loss), ``--steps`` optimizer steps of ``--batch_size``
windows, the same windows in the same order for every method; held-out loss on ``--eval_windows`` windows of the
test split (token-weighted mean cross-entropy).

Methods, all with AdamW, on the same modules (every q/k/v/o/gate/up/down projection; the embeddings and the tied LM
head stay frozen except in full fine-tuning):

* ``full``: full fine-tuning, learning rate ``--lr_full``.
* ``lora``: peft LoRA, r = ``--lora_r``, on the projections, learning rate ``--lr_lora``.
* ``trady``: TraDy at ``--budget_ratio`` (5%) of the cost of every channel, calibrated on ``--calibration_batches``
  training batches (the a priori RGN ranking), learning rate ``--lr_trady`` (about 10x full fine-tuning's: see
  DESIGN.md's known traps). One epoch: the channels are drawn once.
* ``trady_top``: the same, with the selection restricted to the last ``--max_depth`` projections (``max_depth``:
  backpropagation stops at the lowest selected layer, so the layers below keep no activations).

Measured for each: the peak memory of one steady-state training step on the first batch
(``hf_collapse.trady.step_memory``: PyTorch profiler allocation events on CPU, ``max_memory_allocated`` on CUDA) with
its breakdown, the optimizer state, the median step time of the training loop, and the held-out loss before and after.
The machine is shared: times are noisy; ratios measured in the same run are what to read.

    python benchmarks/bench_trady_llm.py
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_collapse.data import embedded_model_path, lm_windows, load_bbc_news  # noqa: E402
from hf_collapse.metrics import perplexity  # noqa: E402
from hf_collapse.trady import TraDyConfig, calibrate, find_trady_model, step_memory  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("full", "lora", "trady", "trady_top")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval_windows", type=int, default=16)
    parser.add_argument("--budget_ratio", type=float, default=0.05)
    parser.add_argument("--calibration_batches", type=int, default=2)
    parser.add_argument("--lr_full", type=float, default=5e-5)
    parser.add_argument("--lr_lora", type=float, default=5e-4)
    parser.add_argument("--lr_trady", type=float, default=5e-4, help="about 10x full fine-tuning's")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--max_depth", type=int, default=56, help="trady_top: the last 8 of 30 blocks' projections")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_trady_llm"))
    return parser.parse_args()


def build(method: str, args, calibration_batches):
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path("smollm2"), dtype=torch.float32)
    model.config.use_cache = False
    info: dict = {}
    if method == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=2 * args.lora_r,
                lora_dropout=0.0,
                target_modules=PROJECTIONS,
                task_type="CAUSAL_LM",
            ),
        )
    elif method.startswith("trady"):
        model = get_peft_model(
            model,
            TraDyConfig(
                task_type="CAUSAL_LM",
                budget_ratio=args.budget_ratio,
                target_modules=PROJECTIONS,
                seed=0,
                max_depth=args.max_depth if method == "trady_top" else None,
            ),
        )
        start = time.perf_counter()
        summary = calibrate(model, calibration_batches)
        info["calibration_s"] = round(time.perf_counter() - start, 1)
        budget = find_trady_model(model).budget_summary()
        info.update(
            selected_layers=len(summary["selected_layers"]),
            channels=budget["channels"],
            layers_with_channels=budget["layers_with_channels"],
            lowest_layer=next(iter(find_trady_model(model).current_selection()), None),
        )
    model.train()
    return model, info


def news_batches(args) -> tuple[list[dict], DataLoader]:
    """``args.steps`` training batches of ``args.batch_size`` BBC News training windows of ``args.seq_len`` tokens, in
    order (what every method trains on), and a loader of ``args.eval_windows`` test windows (what it is measured on)."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("smollm2"))
    news = load_bbc_news()
    train = lm_windows(
        news["train"]["text"], tokenizer, max_length=args.seq_len, max_windows=args.steps * args.batch_size
    )
    held_out = lm_windows(news["test"]["text"], tokenizer, max_length=args.seq_len, max_windows=args.eval_windows)
    return list(DataLoader(train, batch_size=args.batch_size, shuffle=False)), DataLoader(held_out, batch_size=4)


def held_out_loss(model, loader) -> float:
    return math.log(perplexity(model, loader))


def main() -> None:
    args = parse()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    batches, evaluation = news_batches(args)
    lrs = {"full": args.lr_full, "lora": args.lr_lora, "trady": args.lr_trady, "trady_top": args.lr_trady}
    results: dict[str, dict] = {}
    base_loss = None
    print(
        f"SmolLM2-135M on BBC News, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    for method in methods:
        torch.manual_seed(0)
        model, info = build(method, args, batches[: args.calibration_batches])
        if base_loss is None:
            base_loss = held_out_loss(model, evaluation)  # every method starts from the same function
            print(f"held-out loss before fine-tuning: {base_loss:.4f}", flush=True)
        memory = step_memory(model, batches[0], method=method)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lrs[method], weight_decay=0.0)
        times, losses = [], []
        for batch in batches:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
        final = held_out_loss(model, evaluation)
        results[method] = dict(
            lr=lrs[method],
            trainable_elements=sum(p.numel() for p in trainable),
            **info,
            peak_bytes=memory.peak_bytes,
            parameter_bytes=memory.parameter_bytes,
            gradient_bytes=memory.gradient_bytes,
            optimizer_state_bytes=memory.optimizer_state_bytes,
            activation_bytes=memory.activation_bytes,
            saved_for_backward_bytes=memory.saved_for_backward_bytes,
            peak_phase=memory.peak_phase,
            step_s=statistics.median(times[1:] if len(times) > 1 else times),
            train_loss_first=losses[0],
            train_loss_last5=statistics.mean(losses[-5:]),
            held_out_loss=final,
        )
        print(
            f"{method}: peak {memory.peak_bytes / 2**20:.0f} MiB, step {results[method]['step_s']:.2f} s, "
            f"held-out loss {final:.4f}",
            flush=True,
        )
        del model, optimizer, trainable
        gc.collect()

    mib = 2**20
    header = (
        "| method | lr | trainable | peak MiB | params | grads | optimizer state | activations+temp | "
        "saved for backward | peak phase | step s | held-out loss |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for method, r in results.items():
        lines.append(
            f"| {method} | {r['lr']:g} | {r['trainable_elements']:,} | {r['peak_bytes'] / mib:,.0f} | "
            f"{r['parameter_bytes'] / mib:,.0f} | {r['gradient_bytes'] / mib:,.1f} | "
            f"{r['optimizer_state_bytes'] / mib:,.1f} | {r['activation_bytes'] / mib:,.0f} | "
            f"{r['saved_for_backward_bytes'] / mib:,.0f} | {r['peak_phase']} | {r['step_s']:.2f} | "
            f"{r['held_out_loss']:.4f} |"
        )
    checks, targets = {}, []
    for name in ("trady", "trady_top"):
        if name not in results:
            continue
        if "full" in results:
            value = checks[f"{name}_peak_over_full"] = results[name]["peak_bytes"] / results["full"]["peak_bytes"]
            targets.append(
                f"{name} peak / full FT peak = {value:.3f} (target <= 0.4): {'met' if value <= 0.4 else 'NOT met'}"
            )
        if "lora" in results:
            value = checks[f"{name}_peak_over_lora"] = results[name]["peak_bytes"] / results["lora"]["peak_bytes"]
            targets.append(f"{name} peak / LoRA peak = {value:.3f} (target < 1): {'met' if value < 1 else 'NOT met'}")
            value = checks[f"{name}_loss_over_lora"] = results[name]["held_out_loss"] / results["lora"]["held_out_loss"]
            targets.append(
                f"{name} held-out loss / LoRA's = {value:.3f} (target <= 1.05): {'met' if value <= 1.05 else 'NOT met'}"
            )
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    text = "\n".join(
        [
            f"SmolLM2-135M-Instruct fine-tuned on BBC News windows ({args.steps} steps, batch {args.batch_size} x "
            f"{args.seq_len} tokens, AdamW), {device}; held-out loss on {args.eval_windows} test windows "
            f"(before fine-tuning: {base_loss:.4f}).",
            f"TraDy: budget {args.budget_ratio:g} of every channel's cost"
            + "".join(
                f"; {name}: {results[name]['channels']} channels in {results[name]['layers_with_channels']} "
                f"layers (calibration {results[name]['calibration_s']} s)"
                for name in ("trady", "trady_top")
                if name in results
            )
            + f" (trady_top: max_depth {args.max_depth}).",
            "Peak: one steady-state step (forward + backward + optimizer) on the first batch, measured by "
            "hf_collapse.trady.step_memory; step time: median of the training loop (shared machine: noisy).",
            "",
            *lines,
            "",
            *targets,
            "",
        ]
    )
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".txt", "w") as handle:
        handle.write(text)
    with open(args.out + ".json", "w") as handle:
        json.dump(
            {"settings": vars(args), "base_held_out_loss": base_loss, "results": results, "checks": checks},
            handle,
            indent=2,
        )


if __name__ == "__main__":
    main()

"""TraDy vs full fine-tuning vs LoRA vs static channel selection, on a real task, side by side in one run.

Task: the real pretrained all-MiniLM-L6-v2 (6-layer BERT, hidden 384) fine-tuned on the embedded dialog-topic
classification (chatterbot-corpus: 1,486 training and 372 test lines, 19 topics).

Methods, all on the same target modules (every linear of the encoder and the pooler; the classifier head trains in
full everywhere):

* ``full``: full fine-tuning (AdamW).
* ``lora``: peft LoRA, r=8, on the same modules.
* ``static``: TraDy's layers, random channels drawn once and kept (``selection="static_topk_random"``).
* ``trady``: TraDy (a priori RGN layer ranking, channels re-sampled at random every epoch).

Static and TraDy share the memory budget (``--budget_ratio``, 5% of the cost of updating every channel) and the
learning rate (10x full fine-tuning's, see DESIGN.md's known traps).

Measured on one fixed batch: bytes saved for backward (weight-derivative part and total, by
``hf_collapse.trady.memory_report``), peak bytes allocated during a training step (PyTorch profiler allocation
events; CUDA's peak counter on a GPU), persistent optimizer state, and the median step time (rounds interleaved
across methods: the machine is shared). Then every method trains for ``--epochs`` epochs on the same length-bucketed
batches and is evaluated on the test split, once per seed of ``--seeds`` (head initialisation, batch order and
TraDy's draws change with it; the ranking and the measurement batch do not): accuracy is the mean over seeds. With
372 test lines one seed's accuracy has a standard error of about 2 points, so single-seed differences of that size
mean nothing. Targets at a 5% budget are checked and reported.

    python benchmarks/bench_trady.py | tee benchmarks/results/bench_trady.txt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset  # noqa: E402
from hf_collapse.trady import TraDyConfig, calibrate, find_trady_model, memory_report, peak_memory_bytes  # noqa: E402
from hf_collapse.trady.model import default_target_modules  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("full", "lora", "static", "trady")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--budget_ratio", type=float, default=0.05)
    parser.add_argument("--lr_full", type=float, default=1e-4)
    parser.add_argument("--lr_sparse", type=float, default=1e-3, help="static and TraDy (10x full)")
    parser.add_argument("--lr_lora", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="AdamW for every method (as DESIGN.md's measurement), or plain SGD (the paper's choice)",
    )
    parser.add_argument(
        "--resample_every_steps",
        type=int,
        default=None,
        help="re-sample TraDy's channels every N steps instead of every epoch",
    )
    parser.add_argument("--timing_rounds", type=int, default=5)
    parser.add_argument("--eval_every_epoch", action="store_true", help="test accuracy after every epoch")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="data split, calibration and measurement batches")
    parser.add_argument(
        "--seeds",
        default="0,1,2",
        help="training runs per method (head init, batch order, TraDy draws); accuracy is their mean",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_trady"))
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------- data


def load(args):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    data = tokenize_text_dataset(load_dialog_topics(seed=args.seed), tokenizer, max_length=args.max_length)
    if args.max_train_samples:
        data["train"] = data["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    collator = DataCollatorWithPadding(tokenizer)
    num_labels = data["train"].features["label"].num_classes

    def rows(split):
        return [dict(data[split][i]) for i in range(len(data[split]))]

    return rows("train"), rows("test"), collator, num_labels


def collate(collator, rows):
    batch = collator([{k: v for k, v in r.items() if k != "label"} for r in rows])
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    return batch


def bucketed_batches(rows, batch_size, epoch, seed):
    """Length-bucketed batches (sorted chunks of 50 batches, shuffled): the same for every method at an epoch."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(rows[i]["input_ids"]))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------- models


def base_model(num_labels, seed):
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(
        embedded_model_path("minilm"), num_labels=num_labels, dtype=torch.float32
    )
    hf_logging.set_verbosity_warning()
    return model


def build(method, args, num_labels, targets, calibration, seed=None):
    """A fresh model for ``method`` and its learning rate."""
    seed = args.seed if seed is None else seed
    model = base_model(num_labels, seed).to(args.device)
    if method == "full":
        return model, args.lr_full
    if method == "lora":
        config = LoraConfig(
            task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets
        )
        return get_peft_model(model, config), args.lr_lora
    selection = "static_topk_random" if method == "static" else "trady"
    config = TraDyConfig(
        task_type="SEQ_CLS",
        budget_ratio=args.budget_ratio,
        selection=selection,
        seed=seed,
        resample_every_steps=args.resample_every_steps if method == "trady" else None,
    )
    model = get_peft_model(model, config)
    calibrate(model, [to_device(b, args.device) for b in calibration])
    find_trady_model(model).resample(0)  # the epoch-0 draw (already current): this script drives re-sampling
    return model, args.lr_sparse


def optimizer_for(model, lr, kind="adamw"):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def optimizer_state_bytes(optimizer):
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def train_step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# ----------------------------------------------------------------------------------------------- measurements


def measure(methods, args, num_labels, targets, calibration, batch):
    """Memory reports, peak step memory, optimizer state and median step time on one fixed batch."""
    built = {m: build(m, args, num_labels, targets, calibration) for m in methods}
    optimizers = {m: optimizer_for(model, lr, args.optimizer) for m, (model, lr) in built.items()}
    batch = to_device(batch, args.device)
    results = {}
    for method, (model, _) in built.items():
        model.train()
        report = memory_report(model, batch, target_modules=targets if method == "full" else None, method=method)
        train_step(model, optimizers[method], batch)  # warm-up: allocates the optimizer state
        peak = peak_memory_bytes(lambda m=model, o=optimizers[method]: train_step(m, o, batch), args.device)
        results[method] = {
            "report": report,
            "peak_step_bytes": peak,
            "optimizer_state_bytes": optimizer_state_bytes(optimizers[method]),
            "trainable_elements": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "times": [],
        }
    for round_index in range(args.timing_rounds):
        order = list(methods[round_index % len(methods) :]) + list(methods[: round_index % len(methods)])
        for method in order:
            model, _ = built[method]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizers[method], batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            results[method]["times"].append(time.perf_counter() - start)
    for method in methods:
        results[method]["step_seconds"] = statistics.median(results[method]["times"])
    return results


@torch.no_grad()
def accuracy(model, rows, collator, args):
    model.eval()
    correct = 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), 128):
        chunk = [rows[i] for i in order[start : start + 128]]
        batch = to_device(collate(collator, chunk), args.device)
        correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return correct / len(rows)


def train(method, args, num_labels, targets, calibration, train_rows, test_rows, collator, seed):
    model, lr = build(method, args, num_labels, targets, calibration, seed)
    optimizer = optimizer_for(model, lr, args.optimizer)
    tuner = find_trady_model(model) if method in ("static", "trady") else None
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        if tuner is not None and not args.resample_every_steps:
            tuner.resample(epoch, optimizer)  # what TraDyCallback does at every epoch start
        losses = []
        for indices in bucketed_batches(train_rows, args.batch_size, epoch, seed):
            batch = to_device(collate(collator, [train_rows[i] for i in indices]), args.device)
            losses.append(float(train_step(model, optimizer, batch).detach()))
        last = epoch == args.epochs - 1
        history.append(
            {
                "epoch": epoch + 1,
                "loss": sum(losses) / len(losses),
                "accuracy": accuracy(model, test_rows, collator, args) if args.eval_every_epoch or last else None,
            }
        )
        shown = "" if history[-1]["accuracy"] is None else f", test accuracy {history[-1]['accuracy']:.4f}"
        print(f"  {method:6s} seed {seed} epoch {epoch + 1}: train loss {history[-1]['loss']:.4f}{shown}", flush=True)
    seconds = time.perf_counter() - start
    draws = len(tuner.selection_history()) if tuner is not None else None
    return {"accuracy": history[-1]["accuracy"], "history": history, "train_seconds": seconds, "draws": draws}


# ----------------------------------------------------------------------------------------------- report


def table(results, methods):
    """The results, with ratios to full fine-tuning's in parentheses when it was measured."""
    full = results.get("full")

    def ratio(value, key):
        return f" ({value / full[key]:.3f})" if full else ""

    header = (
        "| method | saved for backward: weight-derivative | total | peak step memory | optimizer state | "
        "trainable | step time | accuracy (mean ± std over seeds) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        r = results[m]
        rep = r["report"]
        wd, total = rep.saved_bytes_weight_derivative, rep.saved_bytes_total
        wd_ratio = f" ({wd / full['report'].saved_bytes_weight_derivative:.3f})" if full else ""
        total_ratio = f" ({total / full['report'].saved_bytes_total:.3f})" if full else ""
        step_ratio = f" ({r['step_seconds'] / full['step_seconds']:.2f})" if full else ""
        lines.append(
            f"| {m} | {wd / 2**20:.2f} MiB{wd_ratio} | {total / 2**20:.2f} MiB{total_ratio} "
            f"| {r['peak_step_bytes'] / 2**20:.2f} MiB{ratio(r['peak_step_bytes'], 'peak_step_bytes')} "
            f"| {r['optimizer_state_bytes'] / 2**20:.2f} MiB | {r['trainable_elements']:,} "
            f"| {r['step_seconds'] * 1000:.0f} ms{step_ratio} | {r.get('accuracy', float('nan')):.4f} "
            f"± {r.get('accuracy_std', 0.0):.4f} |"
        )
    return "\n".join(lines)


def targets_check(results):
    full, lora, static, trady = (results[m] for m in METHODS)
    checks = []

    def check(name, ok, detail):
        checks.append({"target": name, "met": bool(ok), "detail": detail})

    wd = trady["report"].saved_bytes_weight_derivative / full["report"].saved_bytes_weight_derivative
    check("weight-derivative activation bytes <= 10% of full fine-tuning's", wd <= 0.10, f"{wd:.3%}")
    total_full = trady["report"].saved_bytes_total / full["report"].saved_bytes_total
    total_lora = trady["report"].saved_bytes_total / lora["report"].saved_bytes_total
    check("total saved bytes below full fine-tuning's", total_full < 1, f"{total_full:.3f}x full")
    check("total saved bytes below LoRA's (same modules)", total_lora < 1, f"{total_lora:.3f}x LoRA")
    peak_full = trady["peak_step_bytes"] / full["peak_step_bytes"]
    peak_lora = trady["peak_step_bytes"] / lora["peak_step_bytes"]
    check(
        "peak step memory below full fine-tuning's and LoRA's",
        peak_full < 1 and peak_lora < 1,
        f"{peak_full:.3f}x full, {peak_lora:.3f}x LoRA",
    )
    step = trady["step_seconds"] / full["step_seconds"]
    check("step time no more than full fine-tuning's", step <= 1.0, f"{step:.2f}x full")
    per_seed = " / ".join(f"{t:.3f} vs {f:.3f}" for t, f in zip(trady["accuracies"], full["accuracies"]))
    gap = full["accuracy"] - trady["accuracy"]
    check(
        "accuracy within 2 points of full fine-tuning",
        gap <= 0.02,
        f"TraDy {trady['accuracy']:.4f} vs full {full['accuracy']:.4f} ({-gap * 100:+.1f} points; per seed {per_seed})",
    )
    over_static = trady["accuracy"] - static["accuracy"]
    check(
        "accuracy above static selection",
        over_static > 0,
        f"TraDy {trady['accuracy']:.4f} vs static {static['accuracy']:.4f} ({over_static * 100:+.1f} points; per "
        f"seed " + " / ".join(f"{t:.3f} vs {s:.3f}" for t, s in zip(trady["accuracies"], static["accuracies"])) + ")",
    )
    return checks


def main() -> None:
    args = parse()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_rows, test_rows, collator, num_labels = load(args)
    targets = default_target_modules(base_model(num_labels, args.seed), ["classifier"])
    rng = random.Random(args.seed)
    calibration = [collate(collator, rng.sample(train_rows, args.batch_size)) for _ in range(4)]
    fixed_batch = collate(collator, random.Random(args.seed + 1).sample(train_rows, args.batch_size))
    print(
        f"MiniLM on dialog topics: {len(train_rows)} train / {len(test_rows)} test, {num_labels} topics; "
        f"{len(targets)} target modules; budget {args.budget_ratio:.0%}; device {args.device}; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    print(f"fixed measurement batch: {tuple(fixed_batch['input_ids'].shape)} tokens", flush=True)

    results = measure(methods, args, num_labels, targets, calibration, fixed_batch)
    trady_probe, _ = build("trady", args, num_labels, targets, calibration) if "trady" in methods else (None, None)
    selection_info = None
    if trady_probe is not None:
        tuner = find_trady_model(trady_probe)
        config = trady_probe.peft_config["default"]
        selection_info = {
            "selected_layers": config.selected_layers,
            "layers": len(tuner.trady_layers()),
            "budget": tuner.budget_summary(),
        }
        print(
            f"TraDy kept {len(config.selected_layers)} of {len(tuner.trady_layers())} layers "
            f"(coverage {config.coverage}); lowest trained: {results['trady']['report'].lowest_trained_layer}"
        )
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    for method in methods:
        print(f"training {method} ...", flush=True)
        runs = [
            train(method, args, num_labels, targets, calibration, train_rows, test_rows, collator, seed)
            for seed in seeds
        ]
        accuracies = [run["accuracy"] for run in runs]
        results[method].update(
            {
                "accuracy": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "accuracies": accuracies,
                "seeds": seeds,
                "runs": runs,
                "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
            }
        )

    print()
    print(table(results, methods))
    print()
    rep = results["trady"]["report"] if "trady" in results else None
    if rep is not None:
        print(
            f"TraDy (paper's metrics, vs updating every channel of every target layer): activation sparsity "
            f"{rep.activation_sparsity:.4f}, weight-derivative sparsity {rep.weight_derivative_sparsity:.4f}, "
            f"weight-derivative FLOPs reduction {rep.weight_derivative_flops_reduction:.4f}"
        )
    if rep is not None and "full" in results:
        full_rep = results["full"]["report"]
        print(
            f"Full fine-tuning keeps {full_rep.saved_bytes_propagation / full_rep.saved_bytes_total:.1%} of its "
            f"saved bytes to propagate gradients (softmax, norms, GELU inputs, dropout masks): TraDy cannot "
            f"remove that part unless max_depth keeps backpropagation near the top."
        )
    checks = targets_check(results) if all(m in results for m in METHODS) else []
    if checks:
        print()
        print("| target (5% budget) | met | measured |")
        print("|---|---|---|")
        for c in checks:
            print(f"| {c['target']} | {'yes' if c['met'] else 'NO'} | {c['detail']} |")
    elapsed = time.perf_counter() - started
    print(f"\nwall time {elapsed / 60:.1f} min")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    serializable = {
        m: {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in r.items()} for m, r in results.items()
    }
    with open(args.out + ".json", "w") as handle:
        json.dump(
            {
                "settings": vars(args),
                "results": serializable,
                "targets": checks,
                "trady": selection_info,
                "wall_seconds": elapsed,
            },
            handle,
            indent=2,
            default=str,
        )


if __name__ == "__main__":
    main()

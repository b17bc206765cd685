"""TLC benchmark.

Part 1 (speed): a RoBERTa-base-sized encoder (random init) with 0, 3, 6 and 12 MLPs linearized and fused:
parameters, FLOPs and latency, timed side by side. Target (issue 4): the measured latency ratio is within 10%
of the FLOPs ratio.

Part 2 (quality): the real MiniLM fine-tuned on the embedded dialog-topic task, then half of its 6 MLP
activations collapsed by TLC (OFF removal, linearization, fusion, ranked by calibration-loss gap) against
EASIER-style removal (the lowest-entropy activation replaced by the identity; no OFF removal, no fusion), with
the same fine-tuning steps between collapses.

    python benchmarks/bench_tlc.py [--skip-quality] [--epochs 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    RobertaConfig,
    RobertaModel,
    Trainer,
    TrainingArguments,
)

from hf_collapse import metrics
from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset
from hf_collapse.data.tasks import accuracy
from hf_collapse.tlc import TLCConfig, activation_sites, activation_statistics, compress, linearize

RESULTS = Path(__file__).parent / "results"


def speed(batch: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    base = RobertaModel(
        RobertaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
        add_pooling_layer=False,
    ).eval()
    inputs = metrics.example_inputs(base, batch_size=batch, seq_len=seq_len)
    sites = activation_sites(base)
    stats = activation_statistics(base, [inputs], sites)
    models = {0: base}
    current = base
    for k in range(1, 13):
        current = linearize(current, stats[sites[k - 1].name])
        if k in (3, 6, 12):
            models[k] = current

    def timed(model):
        with torch.inference_mode():
            start = time.perf_counter()
            model(**inputs)
            return time.perf_counter() - start

    for model in models.values():
        timed(model)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, model in models.items():
            times[k].append(timed(model))
    rows = []
    flops0, latency0 = metrics.forward_flops(base, inputs), statistics.median(times[0])
    for k, model in models.items():
        flops, latency = metrics.forward_flops(model, inputs), statistics.median(times[k])
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
    return {"batch": batch, "seq_len": seq_len, "hardware": metrics.hardware_description(), "rows": rows}


def quality(epochs: float, finetune_steps: int) -> dict:
    path = embedded_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = load_dialog_topics()
    data = tokenize_text_dataset(raw, tokenizer, max_length=64)
    collator = DataCollatorWithPadding(tokenizer)
    out = tempfile.mkdtemp()
    args = TrainingArguments(
        out,
        num_train_epochs=epochs,
        learning_rate=1e-4,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        warmup_steps=0.1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(raw["train"].features["label"].names)
    )
    Trainer(model=model, args=args, train_dataset=data["train"], data_collator=collator).train()

    def evaluate(m):
        return Trainer(
            model=m, args=args, eval_dataset=data["test"], data_collator=collator, compute_metrics=accuracy
        ).evaluate()["eval_accuracy"]

    def finetune(m):
        if finetune_steps:
            tuned = copy.deepcopy(args)
            tuned.max_steps = finetune_steps
            Trainer(model=m, args=tuned, train_dataset=data["train"], data_collator=collator).train()

    half = len(activation_sites(model)) // 2
    inputs = metrics.example_inputs(model, batch_size=1, seq_len=64)
    result = {"fine_tuned_accuracy": evaluate(model), "layers_collapsed": half, "finetune_steps": finetune_steps}

    tlc_model, report = compress(
        model,
        TLCConfig(num_units=half, calibration_batches=8, finetune_steps=finetune_steps),
        data["train"],
        data["test"],
        args,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    result["tlc"] = {
        "accuracy": evaluate(tlc_model),
        "flops": metrics.forward_flops(tlc_model, inputs),
        "params": metrics.count_parameters(tlc_model),
        "sites": [r["name"] for r in report.removed],
    }

    easier = copy.deepcopy(model)
    batches = [collator([data["train"][i] for i in range(j * 32, (j + 1) * 32)]) for j in range(8)]
    for _ in range(half):  # EASIER: the lowest-entropy remaining activation becomes the identity
        stats = activation_statistics(easier, batches, activation_sites(easier))
        name = min(stats, key=lambda n: stats[n].entropy)
        parent, _, attr = name.rpartition(".")
        setattr(easier.bert.get_submodule(parent), attr, nn.Identity())
        finetune(easier)
    result["easier"] = {
        "accuracy": evaluate(easier),
        "flops": metrics.forward_flops(easier, inputs),
        "params": metrics.count_parameters(easier),
    }
    result["original_flops"] = metrics.forward_flops(model, inputs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    result = {"speed": speed(args.batch, args.max_length, args.repeats)}
    s = result["speed"]
    print(f"RoBERTa-base-sized encoder, batch {s['batch']} x {s['seq_len']} tokens, {s['hardware']}")
    print(
        f"{'MLPs fused':>10} {'params':>12} {'GFLOPs':>8} {'latency ms':>11} {'FLOPs ratio':>12} "
        f"{'latency ratio':>14} {'latency/FLOPs':>14}"
    )
    for r in s["rows"]:
        print(
            f"{r['mlps_fused']:>10} {r['params']:>12,} {r['flops'] / 1e9:>8.1f} {r['latency_s'] * 1e3:>11.1f} "
            f"{r['flops_ratio']:>12.3f} {r['latency_ratio']:>14.3f} {r['latency_over_flops_ratio']:>14.3f}"
        )
    worst = min(r["latency_over_flops_ratio"] for r in s["rows"])
    print(
        f"target: latency ratio within 10% of the FLOPs ratio -> worst latency/FLOPs = {worst:.3f} "
        f"({'met' if worst >= 0.9 else 'missed'})"
    )
    if not args.skip_quality:
        q = result["quality"] = quality(args.epochs, args.finetune_steps)
        print(
            f"\nMiniLM on dialog topics: fine-tuned accuracy {q['fine_tuned_accuracy']:.4f}; "
            f"{q['layers_collapsed']} of 6 MLP activations collapsed, {q['finetune_steps']} fine-tuning steps each"
        )
        for name in ("tlc", "easier"):
            r = q[name]
            print(
                f"  {name:<7} accuracy {r['accuracy']:.4f}   FLOPs {r['flops'] / 1e9:.3f} G "
                f"(original {q['original_flops'] / 1e9:.3f} G)   params {r['params']:,}"
            )
    (RESULTS / "bench_tlc.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

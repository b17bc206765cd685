"""What accuracy does TLC keep, against EASIER-style removal, when half of a fine-tuned model's MLP activations go?

The real ``model`` (the embedded MiniLM) fine-tuned on the embedded dialog-topic task (``epochs``, ``learning_rate``,
``batch_size``, ``eval_batch_size``, ``warmup_steps``, ``seed``; lines of at most ``max_length`` tokens; the first
``max_train_samples`` training lines and ``max_test_samples`` test lines, null: all), then ``units`` of its MLP
activations collapsed two ways from that same model, with ``finetune_steps`` fine-tuning steps after each collapse:

* TLC (``hf_collapse.tlc.compress``): OFF neurons removed, the activation linearized and fused, the site chosen by
  its calibration-loss gap on ``calibration_batches`` training batches;
* EASIER-style: the lowest-entropy remaining activation (on the same number of training batches) replaced by the
  identity; no OFF removal, no fusion.

Test accuracy, forward FLOPs (one line of ``max_length`` tokens) and parameters of each. Target: TLC above EASIER.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

VERSION = 1


def _training_args(s: dict, output_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir,
        num_train_epochs=s["epochs"],
        learning_rate=s["learning_rate"],
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=s["eval_batch_size"],
        warmup_steps=s["warmup_steps"],
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        seed=s["seed"],
    )


def _easier(model, s: dict, train, args, collator) -> tuple:
    """``(model copied with its `units` lowest-entropy activations made the identity, one at a time, each followed by
    `finetune_steps` fine-tuning steps, their names)``."""
    from torch import nn
    from transformers import Trainer

    from hf_collapse.tlc import activation_sites, activation_statistics

    easier = copy.deepcopy(model)
    size = s["batch_size"]
    batches = [collator([train[i] for i in range(j * size, (j + 1) * size)]) for j in range(s["calibration_batches"])]
    tuned = copy.deepcopy(args)
    tuned.max_steps = s["finetune_steps"]
    names = []
    for _ in range(s["units"]):
        stats = activation_statistics(easier, batches, activation_sites(easier))
        name = min(stats, key=lambda n: stats[n].entropy)
        names.append(name)
        parent, _, attr = name.rpartition(".")
        setattr(easier.get_submodule(parent), attr, nn.Identity())
        if s["finetune_steps"]:
            Trainer(model=easier, args=tuned, train_dataset=train, data_collator=collator).train()
    return easier, names


def run(s: dict) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from hf_collapse import metrics
    from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset
    from hf_collapse.data.tasks import accuracy
    from hf_collapse.tlc import TLCConfig, compress

    path = embedded_model_path(s["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = load_dialog_topics()
    data = tokenize_text_dataset(raw, tokenizer, max_length=s["max_length"])
    train, test = data["train"], data["test"]
    if s["max_train_samples"]:
        train = train.select(range(min(s["max_train_samples"], len(train))))
    if s["max_test_samples"]:
        test = test.select(range(min(s["max_test_samples"], len(test))))
    collator = DataCollatorWithPadding(tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        args = _training_args(s, scratch)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(raw["train"].features["label"].names)
        )
        Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()

        def evaluated(m) -> float:
            trainer = Trainer(model=m, args=args, eval_dataset=test, data_collator=collator, compute_metrics=accuracy)
            return trainer.evaluate()["eval_accuracy"]

        def measured(m, sites: list[str]) -> dict:
            flops, params = metrics.forward_flops(m, inputs), metrics.count_parameters(m)
            return {"accuracy": evaluated(m), "flops": flops, "params": params, "sites": sites}

        inputs = metrics.example_inputs(model, batch_size=1, seq_len=s["max_length"])
        result = {"train_lines": len(train), "test_lines": len(test), "fine_tuned_accuracy": evaluated(model)}
        config = TLCConfig(
            num_units=s["units"], calibration_batches=s["calibration_batches"], finetune_steps=s["finetune_steps"]
        )
        tlc_model, report = compress(model, config, train, test, args, data_collator=collator, compute_metrics=accuracy)
        result["tlc"] = measured(tlc_model, [r["name"] for r in report.removed])
        result["easier"] = measured(*_easier(model, s, train, args, collator))
        result["original_flops"] = metrics.forward_flops(model, inputs)
    return result


def smoke(s: dict) -> dict:
    return {
        **s,
        "max_length": 16,
        "max_train_samples": 32,
        "max_test_samples": 32,
        "batch_size": 16,
        "eval_batch_size": 32,
        "epochs": 1,
        "units": 1,
        "calibration_batches": 2,
        "finetune_steps": 1,
    }


def _layer(site: str) -> str:
    """The layer number of an activation site (``bert.encoder.layer.3.intermediate.intermediate_act_fn``: 3)."""
    return site.split(".layer.")[-1].split(".")[0]


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    settings, result = results[0]
    lines = [
        f"| model | test accuracy ({result['test_lines']} lines) | GFLOPs (1 x {settings['max_length']} tokens) | "
        "FLOPs vs fine-tuned | params | layers whose activation went |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| {settings['model']} fine-tuned | {result['fine_tuned_accuracy']:.3f} | "
        f"{result['original_flops'] / 1e9:.3f} | 1.00x | | |",
    ]
    for method, name in {"tlc": "TLC", "easier": "EASIER-style"}.items():
        r = result[method]
        sites = ", ".join(_layer(n) for n in r["sites"]) if "sites" in r else "not recorded"
        lines.append(
            f"| {name}, {settings['units']} activations, {settings['finetune_steps']} fine-tuning steps each | "
            f"{r['accuracy']:.3f} | {r['flops'] / 1e9:.3f} | {r['flops'] / result['original_flops']:.2f}x | "
            f"{r['params']:,} | {sites} |"
        )
    return "\n".join(lines) + "\n"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    r = results[0][1]
    fraction = r["tlc"]["flops"] / r["original_flops"]
    return (
        f"TLC {r['tlc']['accuracy']:.3f} accuracy at {fraction:.2f}x the FLOPs; EASIER-style "
        f"{r['easier']['accuracy']:.3f} (fine-tuned: {r['fine_tuned_accuracy']:.3f})"
    )


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    text = f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n"
    if not results:
        return text + "Not run yet.\n"
    r = results[0][1]
    verdict = "met" if r["tlc"]["accuracy"] > r["easier"]["accuracy"] else "missed"
    return (
        f"{text}{docs_table(experiment, results)}\n"
        f"Target: TLC above EASIER -> {r['tlc']['accuracy']:.3f} vs {r['easier']['accuracy']:.3f} ({verdict}).\n"
    )

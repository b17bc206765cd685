"""What does TraDy save against full fine-tuning, LoRA and a static choice of channels on a real task, and at what
accuracy?

The real all-MiniLM-L6-v2 fine-tuned on the embedded dialog topics (19 topics of chat lines; ``data_seed`` splits
them), lines cut to ``max_length`` tokens, batches of ``batch_size``. Methods, all on every linear of the encoder and
the pooler (the classifier head trains in full everywhere): ``full`` (learning rate ``lr_full``), ``lora`` (peft LoRA
of rank ``lora_r``, ``lr_lora``), ``static_topk_random`` (TraDy's layers, random channels drawn once) and ``trady``
(channels re-drawn every epoch, or every ``resample_every_steps``), both at ``budget_ratio`` of every channel's cost
and learning rate ``lr_sparse``; optimizer ``optimizer`` (``adamw`` or ``sgd``). TraDy's layer ranking is calibrated
on 4 random training batches drawn with ``data_seed``.

Two parts. ``part: memory`` (every method of ``methods`` in one process, on one fixed random training batch): bytes
saved for backward (weight-derivative part and total, ``hf_collapse.trady.memory_report``), the peak of a training
step (profiler allocation events on CPU, CUDA's peak counter on a GPU), the optimizer state, and the median step time
over ``timing_rounds`` rounds interleaved across methods (the machine is shared). ``part: accuracy`` (one ``method``,
one ``seed``: head initialisation, batch order, TraDy's draws): ``epochs`` epochs of length-bucketed batches, then
test accuracy. Targets at a 5% budget: weight-derivative bytes <= 10% of full fine-tuning's; total saved bytes and
step peak below full fine-tuning's and LoRA's; step time no more than full fine-tuning's; accuracy within 2 points of
full fine-tuning's and above the static choice's (mean over seeds).
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from pathlib import Path

import torch

from .common import bucketed_batches, mean, std

VERSION = 1
TIMED = True  # the step time, interleaved across methods
SPARSE = ("static_topk_random", "trady")
METHODS = ("full", "lora", *SPARSE)
MIB = 2**20


@functools.lru_cache(maxsize=2)
def _task(data_seed: int, max_length: int, max_train_samples: int | None):
    """``(train rows, test rows, collator, number of labels)`` of the dialog topics."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    data = tokenize_text_dataset(load_dialog_topics(seed=data_seed), tokenizer, max_length=max_length)
    if max_train_samples:
        data["train"] = data["train"].shuffle(seed=data_seed).select(range(max_train_samples))

    def rows(split):
        return [dict(data[split][i]) for i in range(len(data[split]))]

    return rows("train"), rows("test"), DataCollatorWithPadding(tokenizer), data["train"].features["label"].num_classes


def _collate(collator, rows) -> dict:
    batch = collator([{k: v for k, v in r.items() if k != "label"} for r in rows])
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    return batch


class _Setup:
    """What every model of a run shares: the task, the target modules, the calibration batches and the device."""

    def __init__(self, s: dict):
        self.s = s
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.train, self.test, self.collator, self.num_labels = _task(
            s["data_seed"], s["max_length"], s.get("max_train_samples")
        )
        from hf_collapse.trady.model import default_target_modules

        self.targets = default_target_modules(self.base_model(s["data_seed"]), ["classifier"])
        rng = random.Random(s["data_seed"])
        self.calibration = [self.batch(rng.sample(self.train, s["batch_size"])) for _ in range(4)]

    def batch(self, rows) -> dict:
        return {k: v.to(self.device) for k, v in _collate(self.collator, rows).items()}

    def base_model(self, seed: int):
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from hf_collapse.data import embedded_model_path

        torch.manual_seed(seed)
        hf_logging.set_verbosity_error()
        model = AutoModelForSequenceClassification.from_pretrained(
            embedded_model_path("minilm"), num_labels=self.num_labels, dtype=torch.float32
        )
        hf_logging.set_verbosity_warning()
        return model.to(self.device)

    def build(self, method: str, seed: int):
        """A fresh model for ``method`` (TraDy calibrated, at its first draw) and its optimizer."""
        from peft import LoraConfig, get_peft_model

        from hf_collapse.trady import TraDyConfig, calibrate, find_trady_model

        s, model = self.s, self.base_model(seed)
        if method == "full":
            lr = s["lr_full"]
        elif method == "lora":
            config = LoraConfig(
                task_type="SEQ_CLS",
                r=s["lora_r"],
                lora_alpha=2 * s["lora_r"],
                lora_dropout=0.0,
                target_modules=self.targets,
            )
            model, lr = get_peft_model(model, config), s["lr_lora"]
        elif method in SPARSE:
            config = TraDyConfig(
                task_type="SEQ_CLS",
                budget_ratio=s["budget_ratio"],
                selection=method,
                seed=seed,
                resample_every_steps=s.get("resample_every_steps") if method == "trady" else None,
            )
            model, lr = get_peft_model(model, config), s["lr_sparse"]
            calibrate(model, self.calibration)
            find_trady_model(model).resample(0)  # the epoch-0 draw (already current): the run drives re-sampling
        else:
            raise ValueError(f"unknown method {method!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = (
            torch.optim.SGD(params, lr=lr)
            if s["optimizer"] == "sgd"
            else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        )
        return model, optimizer


def _train_step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _optimizer_state_bytes(optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory(s: dict) -> dict:
    from hf_collapse.metrics import hardware_description
    from hf_collapse.trady import find_trady_model, memory_report, peak_memory_bytes

    setup = _Setup(s)
    batch = setup.batch(random.Random(s["data_seed"] + 1).sample(setup.train, s["batch_size"]))
    methods = s["methods"]
    built = {m: setup.build(m, s["data_seed"]) for m in methods}
    results = {}
    for method, (model, optimizer) in built.items():
        model.train()
        targets = setup.targets if method == "full" else None
        report = memory_report(model, batch, target_modules=targets, method=method).to_dict()
        _train_step(model, optimizer, batch)  # warm-up: allocates the optimizer state
        peak = peak_memory_bytes(lambda m=model, o=optimizer: _train_step(m, o, batch), setup.device)
        results[method] = {
            "report": {k: v for k, v in report.items() if k != "layers"},
            "peak_step_bytes": peak,
            "optimizer_state_bytes": _optimizer_state_bytes(optimizer),
            "trainable_elements": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "times": [],
        }
    for round_index in range(s["timing_rounds"]):
        shift = round_index % len(methods)
        for method in list(methods[shift:]) + list(methods[:shift]):
            model, optimizer = built[method]
            _synchronize(setup.device)
            start = time.perf_counter()
            _train_step(model, optimizer, batch)
            _synchronize(setup.device)
            results[method]["times"].append(time.perf_counter() - start)
    for method in methods:
        results[method]["step_seconds"] = statistics.median(results[method]["times"])
    result = {
        "hardware": hardware_description(setup.device),
        "train_lines": len(setup.train),
        "batch_shape": list(batch["input_ids"].shape),
        "target_modules": len(setup.targets),
        "methods": results,
    }
    if "trady" in built:
        model = built["trady"][0]
        result["trady"] = {
            "selected_layers": len(model.peft_config["default"].selected_layers),
            "layers": len(find_trady_model(model).trady_layers()),
            "channels": find_trady_model(model).budget_summary()["channels"],
        }
    return result


@torch.no_grad()
def _accuracy(model, setup: _Setup) -> float:
    model.eval()
    rows, correct = setup.test, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), 128):
        batch = setup.batch([rows[i] for i in order[start : start + 128]])
        correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return correct / len(rows)


def _training(s: dict) -> dict:
    from hf_collapse.trady import find_trady_model

    setup = _Setup(s)
    model, optimizer = setup.build(s["method"], s["seed"])
    tuner = find_trady_model(model) if s["method"] in SPARSE else None
    losses, start = [], time.perf_counter()
    for epoch in range(s["epochs"]):
        if tuner is not None and not s.get("resample_every_steps"):
            tuner.resample(epoch, optimizer)  # what TraDyCallback does at every epoch start
        epoch_losses = []
        for indices in bucketed_batches(setup.train, s["batch_size"], epoch, s["seed"]):
            batch = setup.batch([setup.train[i] for i in indices])
            epoch_losses.append(float(_train_step(model, optimizer, batch).detach()))
        losses.append(statistics.fmean(epoch_losses))
    seconds = time.perf_counter() - start
    return {
        "test_accuracy": _accuracy(model, setup),
        "epoch_losses": losses,
        "train_seconds": seconds,
        "draws": len(tuner.selection_history()) if tuner is not None else None,
        "train_lines": len(setup.train),
        "test_lines": len(setup.test),
    }


def run(s: dict) -> dict:
    return _memory(s) if s["part"] == "memory" else _training(s)


def smoke(s: dict) -> dict:
    """48 training lines of 24 tokens, batches of 16, one epoch, one timing round."""
    small = {**s, "max_train_samples": 48, "max_length": 24, "batch_size": 16}
    if s["part"] == "memory":
        return {**small, "timing_rounds": 1}
    return {**small, "epochs": 1, "seed": 0}


# ------------------------------------------------------------------------------------------------ report


def _memory_result(results) -> dict | None:
    return next((r for s, r in results if s["part"] == "memory"), None)


def _accuracies(results) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for s, r in sorted(results, key=lambda sr: sr[0].get("seed", 0)):
        if s["part"] == "accuracy":
            found.setdefault(s["method"], []).append(r["test_accuracy"])
    return found


def _methods(results) -> list[str]:
    """The methods of ``results``, full fine-tuning first (the reference of the ratios)."""
    seen = {m for s, _ in results for m in ([s["method"]] if s["part"] == "accuracy" else s["methods"])}
    return [m for m in METHODS if m in seen]


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    memory, accuracies = _memory_result(results), _accuracies(results)
    runs = memory["methods"] if memory else {}
    full = runs.get("full")

    def ratio(value: float, reference: float | None, digits: int = 3) -> str:
        return f" ({value / reference:.{digits}f})" if reference else ""

    lines = [
        "| method | saved for backward: weight-derivative | total | peak step memory | optimizer state | trainable | "
        "step time | test accuracy, mean ± std over seeds (runs) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in _methods(results):
        values = accuracies.get(method)
        accuracy = f"{100 * mean(values):.1f} ± {100 * std(values):.1f} ({len(values)})" if values else "not run yet"
        r = runs.get(method)
        if r is None:
            lines.append(f"| {method} | not run yet | | | | | | {accuracy} |")
            continue
        wd, total = r["report"]["saved_bytes_weight_derivative"], r["report"]["saved_bytes_total"]
        full_wd = full["report"]["saved_bytes_weight_derivative"] if full else None
        full_total = full["report"]["saved_bytes_total"] if full else None
        lines.append(
            f"| {method} | {wd / MIB:.2f} MiB{ratio(wd, full_wd)} | {total / MIB:.2f} MiB{ratio(total, full_total)} | "
            f"{r['peak_step_bytes'] / MIB:.2f} MiB{ratio(r['peak_step_bytes'], full and full['peak_step_bytes'])} | "
            f"{r['optimizer_state_bytes'] / MIB:.2f} MiB | {r['trainable_elements']:,} | "
            f"{r['step_seconds'] * 1000:.0f} ms{ratio(r['step_seconds'], full and full['step_seconds'], 2)} | "
            f"{accuracy} |"
        )
    return "\n".join(lines) + "\n"


def _checks(results) -> list[tuple[str, bool, str]]:
    """The targets at a 5% budget that the cached results can decide: ``(target, met, measured)``."""
    memory, accuracies = _memory_result(results), _accuracies(results)
    checks = []
    runs = memory["methods"] if memory else {}
    if all(m in runs for m in ("full", "lora", "trady")):
        full, lora, trady = runs["full"], runs["lora"], runs["trady"]
        wd = trady["report"]["saved_bytes_weight_derivative"] / full["report"]["saved_bytes_weight_derivative"]
        checks.append(("weight-derivative activation bytes <= 10% of full fine-tuning's", wd <= 0.10, f"{wd:.3%}"))
        total_full = trady["report"]["saved_bytes_total"] / full["report"]["saved_bytes_total"]
        total_lora = trady["report"]["saved_bytes_total"] / lora["report"]["saved_bytes_total"]
        checks.append(("total saved bytes below full fine-tuning's", total_full < 1, f"{total_full:.3f}x full"))
        checks.append(("total saved bytes below LoRA's (same modules)", total_lora < 1, f"{total_lora:.3f}x LoRA"))
        peak_full = trady["peak_step_bytes"] / full["peak_step_bytes"]
        peak_lora = trady["peak_step_bytes"] / lora["peak_step_bytes"]
        checks.append(
            (
                "peak step memory below full fine-tuning's and LoRA's",
                peak_full < 1 and peak_lora < 1,
                f"{peak_full:.3f}x full, {peak_lora:.3f}x LoRA",
            )
        )
        step = trady["step_seconds"] / full["step_seconds"]
        checks.append(("step time no more than full fine-tuning's", step <= 1.0, f"{step:.2f}x full"))
    trady = accuracies.get("trady")
    for other, words, met in (
        ("full", "accuracy within 2 points of full fine-tuning", lambda gap: gap >= -0.02),
        ("static_topk_random", "accuracy above static selection", lambda gap: gap > 0),
    ):
        if trady and accuracies.get(other):
            gap = mean(trady) - mean(accuracies[other])
            per_seed = " / ".join(f"{t:.3f} vs {o:.3f}" for t, o in zip(trady, accuracies[other]))
            detail = (
                f"TraDy {mean(trady):.4f} vs {other} {mean(accuracies[other]):.4f} ({100 * gap:+.1f} points; "
                f"per seed {per_seed})"
            )
            checks.append((words, met(gap), detail))
    return checks


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    memory, accuracies = _memory_result(results), _accuracies(results)
    parts = []
    runs = memory["methods"] if memory else {}
    if all(m in runs for m in ("full", "lora", "trady")):
        full, lora, trady = runs["full"], runs["lora"], runs["trady"]
        saved = [r["report"]["saved_bytes_total"] / full["report"]["saved_bytes_total"] for r in (trady, lora)]
        wd = trady["report"]["saved_bytes_weight_derivative"] / full["report"]["saved_bytes_weight_derivative"]
        parts += [
            f"weight-derivative bytes {wd:.3f}x full",
            f"total saved bytes {saved[0]:.2f}x (LoRA {saved[1]:.2f}x)",
            f"step time {trady['step_seconds'] / full['step_seconds']:.2f}x",
        ]
    if accuracies.get("trady"):
        others = ", ".join(
            f"{name} {mean(accuracies[m]):.3f}"
            for m, name in (("full", "full"), ("static_topk_random", "static"))
            if accuracies.get(m)
        )
        parts.append(f"accuracy {mean(accuracies['trady']):.3f} vs {others} ({len(accuracies['trady'])} seeds)")
    return "; ".join(parts) or "not run yet"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    memory = _memory_result(results)
    lines = [f"# {experiment['name']}", "", experiment.get("description", ""), ""]
    if memory:
        lines += [
            f"{memory['hardware']}; {memory['train_lines']} training lines, {memory['target_modules']} target modules; "
            f"the fixed measurement batch has {memory['batch_shape'][0]} x {memory['batch_shape'][1]} tokens. "
            "In parentheses: the ratio to full fine-tuning's.",
            "",
        ]
    lines.append(docs_table(experiment, results))
    if memory and "trady" in memory["methods"]:
        trady = memory["methods"]["trady"]["report"]
        kept = memory["trady"]
        lines += [
            f"TraDy kept {kept['selected_layers']} of {kept['layers']} layers ({kept['channels']:,} channels); lowest "
            f"trained: `{trady['lowest_trained_layer']}`. The paper's metrics, against updating every channel of every "
            f"target layer: activation sparsity {trady['activation_sparsity']:.4f}, weight-derivative sparsity "
            f"{trady['weight_derivative_sparsity']:.4f}, weight-derivative FLOPs reduction "
            f"{trady['weight_derivative_flops_reduction']:.4f}.",
            "",
        ]
        if "full" in memory["methods"]:
            full = memory["methods"]["full"]["report"]
            share = full["saved_bytes_propagation"] / full["saved_bytes_total"]
            lines += [
                f"Full fine-tuning keeps {share:.1%} of its saved "
                "bytes to propagate gradients (softmax, norms, GELU inputs, dropout masks): TraDy cannot remove that "
                "part unless max_depth keeps backpropagation near the top.",
                "",
            ]
    checks = _checks(results)
    if checks:
        lines += ["| target | met | measured |", "| --- | --- | --- |"]
        lines += [f"| {target} | {'yes' if met else 'NO'} | {detail} |" for target, met, detail in checks]
    return "\n".join(lines) + "\n"

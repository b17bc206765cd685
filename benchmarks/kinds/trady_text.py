"""TraDy on text classification with the real MiniLM: which channel selection at which budget, length and re-sampling
frequency, against full fine-tuning and LoRA (their step's peak memory beside them).

Settings: ``task`` (``dialog_topics``: 19 topics of chat lines; ``bbc_news``: 5 topics of news articles),
``method`` (``full``, ``lora`` or a TraDy selection: ``trady``, ``static_topk_random``, ``rgn_weighted``,
``static_rgn_weighted``, ``det_rgn``, ``static_top_rgn``, ``full_random``), ``budget_ratio``, ``epochs``,
``resample_every_steps`` (``null``: per epoch), ``seed``, ``batch_size``, ``max_length``, ``max_train_samples``,
learning rates ``lr_sparse`` / ``lr_full`` / ``lr_lora``,
``lora_r``; ``gradient_checkpointing`` (full fine-tuning and LoRA); ``peak_budget`` (TraDy selections: instead of a
channel budget, ``TraDyConfig(peak_bytes=...)`` at this share of plain full fine-tuning's measured step peak, or
``"lora"``: the measured step peak of LoRA with gradient checkpointing; both measured on a full batch,
``batch_size`` lines padded to ``max_length``, the shape the plan is made on and that bounds every batch of the run).

The validation split (carved from the training lines for dialog topics, the corpus's own for BBC News) decides; the
test split is reported. The layer ranking is calibrated on the same 4 batches for every seed; the seed changes the
head's initialisation, the batch order and TraDy's draws.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from .common import bucketed_batches, mean, smoke_size, std

VERSION = 1
SPARSE = (
    "trady",
    "static_topk_random",
    "rgn_weighted",
    "static_rgn_weighted",
    "det_rgn",
    "static_top_rgn",
    "full_random",
)


@functools.lru_cache(maxsize=4)
def load_task(task: str, max_length: int, max_train_samples: int | None):
    from transformers import AutoTokenizer

    from hf_collapse.data import embedded_model_path, load_bbc_news, load_dialog_topics, tokenize_text_dataset

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    if task == "dialog_topics":
        data = load_dialog_topics(seed=0)
        carved = data["train"].train_test_split(test_size=0.1, seed=0, stratify_by_column="label")
        data["train"], data["validation"] = carved["train"], carved["test"]
    elif task == "bbc_news":
        data = load_bbc_news()
    else:
        raise ValueError(f"unknown task {task!r}")
    data = tokenize_text_dataset(data, tokenizer, max_length=max_length)
    if max_train_samples:
        data["train"] = data["train"].shuffle(seed=0).select(range(min(max_train_samples, len(data["train"]))))
    rows = {split: [dict(data[split][i]) for i in range(len(data[split]))] for split in ("train", "validation", "test")}
    return rows, tokenizer, data["train"].features["label"].num_classes


def text_batch(tokenizer, rows, max_length: int | None = None):
    """``rows`` padded to their longest line, or to ``max_length`` tokens when given."""
    lines = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows]
    padding = {"padding": "max_length", "max_length": max_length} if max_length else {}
    padded = tokenizer.pad(lines, **padding)
    batch = {k: torch.tensor(v) for k, v in padded.items()}
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    return batch


@torch.no_grad()
def _evaluate(model, tokenizer, rows) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``rows``."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(rows), 128):
        batch = text_batch(tokenizer, rows[start : start + 128])
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
    model.train()
    return correct / len(rows), loss / len(rows)


def minilm_classifier(seed: int, num_labels: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from hf_collapse.data import embedded_model_path

    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_path("minilm"), num_labels=num_labels)
    hf_logging.set_verbosity_warning()
    return model


def _lora(model, s: dict):
    from peft import LoraConfig, get_peft_model

    from hf_collapse import compat
    from hf_collapse.trady.model import default_target_modules

    targets = default_target_modules(model)
    config = LoraConfig(task_type="SEQ_CLS", r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules=targets)
    model = get_peft_model(model, config)
    if s.get("gradient_checkpointing"):
        compat.set_activation_checkpointing(model.base_model.model, True)
        model.base_model.model.enable_input_require_grads()  # LoRA sits in every block: the input must need grads
    return model


def _peak_limit(s: dict, num_labels: int, full_batch: dict) -> int:
    """The step peak ``peak_budget`` names, in bytes, measured on ``full_batch``."""
    from hf_collapse.trady import step_memory

    if s["peak_budget"] == "lora":  # LoRA made as light as it gets: with gradient checkpointing
        lora = _lora(minilm_classifier(s["seed"], num_labels).train(), {**s, "gradient_checkpointing": True})
        return step_memory(lora, full_batch).peak_bytes
    full = step_memory(minilm_classifier(s["seed"], num_labels).train(), full_batch, method="full").peak_bytes
    return int(float(s["peak_budget"]) * full)


def _model(s: dict, num_labels: int, calibration: list[dict]):
    from peft import get_peft_model

    from hf_collapse import compat
    from hf_collapse.trady import TraDyConfig, calibrate

    if s["method"] == "full":
        model = minilm_classifier(s["seed"], num_labels)
        if s.get("gradient_checkpointing"):
            compat.set_activation_checkpointing(model, True)
        return model, s["lr_full"]
    if s["method"] == "lora":
        return _lora(minilm_classifier(s["seed"], num_labels), s), s["lr_lora"]
    peak = _peak_limit(s, num_labels, calibration[0]) if s.get("peak_budget") is not None else None
    config = TraDyConfig(
        task_type="SEQ_CLS",
        budget_ratio=s["budget_ratio"],
        peak_bytes=peak,
        selection=s["method"],
        seed=s["seed"],
        resample_every_steps=s.get("resample_every_steps"),
    )
    model = get_peft_model(minilm_classifier(s["seed"], num_labels), config)
    calibrate(model, calibration)
    return model, s["lr_sparse"]


def run(s: dict) -> dict:
    from hf_collapse.trady import SELECTIONS, find_trady_model, peak_memory_bytes

    rows, tokenizer, num_labels = load_task(s["task"], s["max_length"], s.get("max_train_samples"))
    train = rows["train"]
    # Under a peak budget (and for the methods it is compared with) the step peak is planned and measured on full
    # batches: every batch of the run is at most that long.
    full_shape = s.get("peak_budget") is not None or bool(s.get("gradient_checkpointing"))
    padded_to = s["max_length"] if full_shape else None
    calibration = [
        text_batch(tokenizer, [train[i] for i in b], padded_to)
        for b in bucketed_batches(train, s["batch_size"], 0, 0)[:4]
    ]
    model, lr = _model(s, num_labels, calibration)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    tuner = find_trady_model(model) if s["method"] in SELECTIONS else None
    strategy = SELECTIONS.get(s["method"]) if tuner is not None else None

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    peak, losses, start = None, [], time.perf_counter()
    for epoch in range(s["epochs"]):
        if tuner is not None and not s.get("resample_every_steps"):
            if strategy.refreshes_rgn and epoch > 0:
                tuner.refresh_rgn(calibration)
            tuner.resample(epoch, optimizer)  # what TraDyCallback does at every epoch start
        losses = []
        for indices in bucketed_batches(train, s["batch_size"], epoch, s["seed"]):
            batch = text_batch(tokenizer, [train[i] for i in indices])
            if peak is None:  # the first step, measured: forward, backward and the AdamW step (its state allocated)
                first: list[float] = []
                peak = peak_memory_bytes(lambda b=batch, out=first: out.append(step(b)))
                losses.append(first[0])
            else:
                losses.append(step(batch))
    (validation, _), (test, test_loss) = (_evaluate(model, tokenizer, rows[split]) for split in ("validation", "test"))
    result = {
        "validation_accuracy": validation,
        "test_accuracy": test,
        "test_loss": test_loss,
        "final_train_loss": statistics.fmean(losses),
        "train_seconds": round(time.perf_counter() - start, 1),
        "first_step_peak_bytes": peak,
        "trainable_elements": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if tuner is not None:
        result["draws"] = len(tuner.selection_history())
        result["channels"] = tuner.budget_summary()["channels"]
        plan = tuner.peft_config["default"].peak_plan
        if plan:
            result["peak_plan"] = {k: v for k, v in plan.items() if k != "trials"}
    if full_shape:  # the step peak on a full batch, after training
        from hf_collapse.trady import step_memory

        result["full_batch_peak_bytes"] = step_memory(model, calibration[0]).peak_bytes
    return result


def smoke(s: dict) -> dict:
    """The same method and task on 48 training lines, one epoch of batches of 16, 24 tokens, budget 5%."""
    return smoke_size(s, 2, epochs=1, max_train_samples=48, batch_size=16, max_length=24)


# ------------------------------------------------------------------------------------------------ report


def _groups(results, **fixed):
    """``{(task, method, budget, epochs, resample): [result, ...]}`` of the runs matching ``fixed``."""
    groups: dict[tuple, list[dict]] = {}
    for s, r in results:
        if all(s.get(k) == v for k, v in fixed.items()):
            key = (s["task"], s["method"], s.get("budget_ratio"), s["epochs"], s.get("resample_every_steps"))
            groups.setdefault(key, []).append(r)
    return groups


SPLITS = ("validation", "test")


def _splitmean(runs, split: str) -> float:
    return mean([r[f"{split}_accuracy"] for r in runs])


def _cell(runs, split="test") -> str:
    values = [r[f"{split}_accuracy"] for r in runs]
    if not values:
        return ""
    return f"{100 * mean(values):.1f} ± {100 * std(values):.1f} ({len(values)})"


def _budget_table(results, epochs: int) -> list[str]:
    groups = _groups(results, epochs=epochs, resample_every_steps=None)
    tasks = sorted({k[0] for k in groups})
    budgets = sorted({k[2] for k in groups if k[1] in SPARSE})
    methods = [m for m in SPARSE if any(k[1] == m for k in groups)]
    lines = []
    for task in tasks:
        lines += [
            f"**{task}**, {epochs} epochs, re-sampled per epoch: test accuracy, mean ± std over seeds (runs)",
            "",
            "| selection | " + " | ".join(f"budget {100 * b:g}%" for b in budgets) + " |",
            "| --- | " + " | ".join("---:" for _ in budgets) + " |",
        ]
        for method in methods:
            cells = [_cell(groups.get((task, method, b, epochs, None), [])) for b in budgets]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for method in ("full", "lora"):
            runs = groups.get((task, method, None, epochs, None)) or next(
                (v for k, v in groups.items() if k[0] == task and k[1] == method), []
            )
            if runs:
                peak = mean([r["first_step_peak_bytes"] for r in runs]) / 2**20
                lines.append(f"| {method} (peak {peak:.0f} MiB) | " + " | ".join(_cell(runs) for _ in budgets) + " |")
        lines.append("")
    return lines


#: Each re-sampling selection and the static one that draws the same way once: their gap is what re-sampling buys.
PAIRS = (
    ("trady", "static_topk_random", "uniform draws"),
    ("rgn_weighted", "static_rgn_weighted", "RGN-weighted draws"),
    ("det_rgn", "static_top_rgn", "top-RGN channels (re-measured: outside the budget)"),
)


def _dynamic_vs_static(results) -> list[tuple[str, dict]]:
    """Every regime (draws, budget, epochs, resample) with both the re-sampling and the static selection measured: the
    gap per task, on validation and test (points, mean over seeds)."""
    groups = _groups(results)
    rows = []
    for dynamic_name, static_name, draws in PAIRS:
        regimes = sorted(
            {(k[2], k[3], k[4]) for k in groups if k[1] == dynamic_name},
            key=lambda r: (r[0], r[1], r[2] or 0),
        )
        for budget, epochs, resample in regimes:
            gaps = {}
            for task in sorted({k[0] for k in groups}):
                dynamic = groups.get((task, dynamic_name, budget, epochs, resample))
                static = groups.get((task, static_name, budget, epochs, None))
                if dynamic and static:
                    gaps[task] = {
                        split: 100 * (_splitmean(dynamic, split) - _splitmean(static, split)) for split in SPLITS
                    }
            if gaps:
                label = f"{draws}, budget {100 * budget:g}%, {epochs} epochs, " + (
                    f"re-sampled every {resample} steps" if resample else "re-sampled per epoch"
                )
                rows.append((label, gaps))
    return rows


def _regime_table(results) -> list[str]:
    tasks = sorted({s["task"] for s, _ in results})
    lines = ["| regime | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for label, gaps in _dynamic_vs_static(results):
        cells = [f"{gaps[t]['validation']:+.1f} / {gaps[t]['test']:+.1f}" if t in gaps else "" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _winning(results) -> list[str]:
    """The regimes where re-sampling beats a static choice by at least 1 point on every task (validation)."""
    tasks = {s["task"] for s, _ in results}
    return [
        label
        for label, gaps in _dynamic_vs_static(results)
        if len(gaps) == len(tasks) and all(g["validation"] >= 1.0 for g in gaps.values())
    ]


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    lines = [f"# {experiment['name']}", "", experiment.get("description", ""), ""]
    for e in sorted({s["epochs"] for s, _ in results}):
        lines += _budget_table(results, e)
    lines += [
        "Re-sampling minus the static selection that draws the same way once (trady - static_topk_random, "
        "rgn_weighted - static_rgn_weighted, det_rgn - static_top_rgn), points of accuracy (validation / test):",
        "",
    ]
    lines += _regime_table(results)
    winning = _winning(results)
    lines += [
        "",
        "Regimes where re-sampling beats a static choice by at least 1 point on every task (validation, mean over "
        "seeds): " + ("; ".join(winning) if winning else "none"),
        "",
    ]
    _plot(results, out / f"{experiment['name']}.png")
    lines.append(f"![accuracy against budget]({experiment['name']}.png)")
    return "\n".join(lines) + "\n"


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    """The budget table at the shortest training length, or (``part="regimes"``) dynamic minus static per regime."""
    if part == "regimes":
        return "\n".join(_regime_table(results)) + "\n"
    epochs = min(s["epochs"] for s, _ in results)
    return "\n".join(_budget_table(results, epochs)) + "\n"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    tasks = sorted({s["task"] for s, _ in results})
    complete = [(label, gaps) for label, gaps in _dynamic_vs_static(results) if len(gaps) == len(tasks)]
    if not complete:
        return "no regime with both selections measured yet"
    label, gaps = max(complete, key=lambda lg: min(g["validation"] for g in lg[1].values()))
    best = ", ".join(f"{t} {gaps[t]['validation']:+.1f}" for t in tasks)
    winning = _winning(results)
    verdict = f"re-sampling wins by >= 1 point on both in: {'; '.join(winning)}" if winning else "no regime wins"
    return (
        f"re-sampling minus the same draw kept, validation points, {len(complete)} regimes: best {label} ({best}); "
        f"{verdict}"
    )


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = min(s["epochs"] for s, _ in results)
    groups = _groups(results, epochs=epochs, resample_every_steps=None)
    tasks = sorted({k[0] for k in groups})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for method in SPARSE:
            points = sorted((k[2], v) for k, v in groups.items() if k[0] == task and k[1] == method)
            if points:
                budgets = [100 * b for b, _ in points]
                means = [100 * mean([r["test_accuracy"] for r in v]) for _, v in points]
                errors = [100 * std([r["test_accuracy"] for r in v]) for _, v in points]
                axis.errorbar(budgets, means, yerr=errors, marker="o", capsize=3, label=method)
        for method, style in (("full", "--"), ("lora", ":")):
            runs = next((v for k, v in groups.items() if k[0] == task and k[1] == method), None)
            if runs:
                level = 100 * _splitmean(runs, "test")
                axis.axhline(level, linestyle=style, color="grey", label=method)
        axis.set_xscale("log")
        axis.set_xlabel("budget (% of every channel's cost)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{task}, {epochs} epochs")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

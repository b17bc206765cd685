"""TraDy on causal-LM fine-tuning of the real SmolLM2-135M: which channel selection at which budget, against LoRA.

Settings: ``method`` (``lora`` or a TraDy selection), ``budget_ratio``, ``steps`` optimizer steps of ``batch_size``
BBC News training windows of ``seq_len`` tokens (their order set by ``seed``), ``resample_every_steps`` (a short run
has one epoch: re-sampling is by steps), ``lr_sparse`` / ``lr_lora``, ``lora_r``, ``eval_windows``. Held-out loss
(token-weighted cross-entropy) on validation windows (which decide) and test windows (reported) of the de-duplicated
BBC News split.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from .common import mean, smoke_size, std
from .smollm2_news import PROJECTIONS, held_out_loss, news_windows, smollm2, stack

VERSION = 1


def _loss(model, rows) -> float:
    model.eval()
    value = held_out_loss(model, rows)
    model.train()
    return value


def run(s: dict) -> dict:
    from peft import LoraConfig, get_peft_model

    from hf_collapse.trady import TraDyConfig, calibrate, find_trady_model

    train, validation, test = news_windows(s["seq_len"], s["steps"] * s["batch_size"], s["eval_windows"])
    order = list(range(len(train)))
    random.Random(s["seed"]).shuffle(order)
    batches = [stack([train[i] for i in order[j : j + s["batch_size"]]]) for j in range(0, len(order), s["batch_size"])]
    torch.manual_seed(s["seed"])
    model = smollm2()
    before = None
    if s["method"] == "lora":
        config = LoraConfig(
            r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules=PROJECTIONS, task_type="CAUSAL_LM"
        )
        model, lr = get_peft_model(model, config), s["lr_lora"]
    else:
        config = TraDyConfig(
            task_type="CAUSAL_LM",
            budget_ratio=s["budget_ratio"],
            target_modules=PROJECTIONS,
            selection=s["method"],
            seed=s["seed"],
            resample_every_steps=s.get("resample_every_steps"),
        )
        model, lr = get_peft_model(model, config), s["lr_sparse"]
        calibrate(model, batches[:2])
        before = find_trady_model(model).budget_summary()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss  # lm_windows carry their labels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    result = {
        "validation_loss": _loss(model, validation),
        "test_loss": _loss(model, test),
        "final_train_loss": statistics.fmean(losses[-5:]),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    if before is not None:
        tuner = find_trady_model(model)
        result.update(draws=len(tuner.selection_history()), channels=before["channels"])
    return result


def smoke(s: dict) -> dict:
    """Two steps of one 32-token window, two windows to evaluate (the real SmolLM2: loading it is most of the time)."""
    return smoke_size(s, 1, steps=2, batch_size=1, seq_len=32, eval_windows=2)


def _groups(results):
    groups: dict[tuple, list[dict]] = {}
    for s, r in results:
        groups.setdefault((s["method"], s.get("budget_ratio")), []).append(r)
    return groups


def _cell(runs, split: str) -> str:
    values = [r[f"{split}_loss"] for r in runs]
    return f"{mean(values):.4f} ± {std(values):.4f} ({len(values)})"


def docs_table(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    groups = _groups(results)
    lines = [
        "| method | budget | held-out loss, validation | held-out loss, test |",
        "| --- | ---: | ---: | ---: |",
    ]
    for (method, budget), runs in sorted(groups.items(), key=lambda kv: (kv[0][1] or 1, kv[0][0])):
        shown = f"{100 * budget:g}%" if budget is not None else ""
        lines.append(f"| {method} | {shown} | {_cell(runs, 'validation')} | {_cell(runs, 'test')} |")
    return "\n".join(lines) + "\n"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    groups = _groups(results)
    cells = [
        f"{method}{f' {100 * budget:g}%' if budget is not None else ''} {mean(r['test_loss'] for r in runs):.3f}"
        for (method, budget), runs in sorted(groups.items(), key=lambda kv: (kv[0][1] or 1, kv[0][0]))
    ]
    return "held-out loss (test, mean over seeds): " + ", ".join(cells)


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    groups = _groups(results)
    lines = [f"# {experiment['name']}", "", experiment.get("description", ""), "", docs_table(experiment, results)]
    for budget in sorted({b for _, b in groups if b is not None}):
        dynamic, static = groups.get(("trady", budget)), groups.get(("static_topk_random", budget))
        if dynamic and static:
            gap = {
                split: mean(r[f"{split}_loss"] for r in static) - mean(r[f"{split}_loss"] for r in dynamic)
                for split in ("validation", "test")
            }
            lines.append(
                f"Budget {100 * budget:g}%: static minus dynamic held-out loss {gap['validation']:+.4f} (validation), "
                f"{gap['test']:+.4f} (test); positive: re-sampling helps."
            )
    return "\n".join(lines) + "\n"

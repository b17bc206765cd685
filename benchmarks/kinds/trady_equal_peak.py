"""TraDy against LoRA at equal peak memory on text classification with the real MiniLM: TraDy given a budget on the
whole step's peak (``peak_bytes``: LoRA's measured step peak, or a share of plain full fine-tuning's) against LoRA with
the same batch and gradient checkpointing, each at the learning rate its validation accuracy picks.

The runs are :mod:`trady_text`'s (its settings; ``peak_budget`` and ``gradient_checkpointing`` are what this
experiment varies, with ``lr_sparse`` / ``lr_lora`` grids). The report groups the seeds of each method and learning
rate, keeps per method and task the learning rate of best mean validation accuracy, and reports the test split: the
learning rate is tuned on validation only. Target: every TraDy step within its peak budget; the accuracy against LoRA
at equal peak, stated.
"""

from __future__ import annotations

from pathlib import Path

from . import trady_text
from .common import mean, std
from .trady_text import SPARSE, run  # noqa: F401  (the runs are trady_text's)

VERSION = 1
MIB = 2**20
LR_SETTING = {"full": "lr_full", "lora": "lr_lora"}


def smoke(s: dict) -> dict:
    """:func:`trady_text.smoke` on one task at one learning rate: one smoke run per peak budget and LoRA setting."""
    return trady_text.smoke({**s, "task": "dialog_topics", "lr_sparse": 1e-3, "lr_lora": 1e-3})


def _label(s: dict) -> str:
    if s["method"] in SPARSE:
        budget = s.get("peak_budget")
        at = "LoRA's (checkpointing) peak" if budget == "lora" else f"{float(budget):g}x full fine-tuning's peak"
        return f"TraDy ({s['method']}) at {at}" if budget is not None else f"TraDy ({s['method']})"
    checkpointing = ", checkpointing" if s.get("gradient_checkpointing") else ""
    return {"full": "full fine-tuning", "lora": f"LoRA r={s['lora_r']}"}[s["method"]] + checkpointing


def _lr(s: dict) -> float:
    return s[LR_SETTING.get(s["method"], "lr_sparse")]


def _by_learning_rate(results) -> dict[tuple[str, str, float], list[dict]]:
    """``{(task, method label, learning rate): [result of each seed]}``."""
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for s, r in results:
        groups.setdefault((s["task"], _label(s), _lr(s)), []).append(r)
    return groups


def tuned(results) -> dict[tuple[str, str], tuple[float, list[dict]]]:
    """``{(task, method label): (learning rate, runs)}``: per method and task, the learning rate whose runs have the
    best mean validation accuracy, with those runs."""
    best: dict[tuple[str, str], tuple[float, list[dict]]] = {}
    for (task, label, lr), runs in _by_learning_rate(results).items():
        score = mean(r["validation_accuracy"] for r in runs)
        if (task, label) not in best or score > mean(r["validation_accuracy"] for r in best[task, label][1]):
            best[task, label] = (lr, runs)
    return best


def _peak(runs: list[dict]) -> float | None:
    peaks = [r.get("full_batch_peak_bytes") for r in runs]
    return max(peaks) / MIB if all(p is not None for p in peaks) else None


def _within(runs: list[dict]) -> bool | None:
    plans = [r.get("peak_plan") for r in runs]
    if not all(plans):
        return None
    return all(r["full_batch_peak_bytes"] <= p["peak_bytes"] for r, p in zip(runs, plans))


def _plan(runs: list[dict]) -> str:
    plans = [r.get("peak_plan") for r in runs]
    if not all(plans):
        return ""
    shares = [p["budget_elements"] / p["cap_elements"] for p in plans]
    depth = {"any" if p["max_depth"] is None else f"last {p['max_depth']}" for p in plans}
    checkpointing = {"on" if p["gradient_checkpointing"] else "off" for p in plans}
    return (
        f"{mean(p['peak_bytes'] for p in plans) / MIB:,.0f} MiB: {100 * min(shares):.1f}-{100 * max(shares):.1f}% of "
        f"channels, depth {'/'.join(sorted(depth))}, checkpointing {'/'.join(sorted(checkpointing))}"
    )


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    best = tuned(results)
    lines = [
        "| task | method | peak budget: what it bought | full-batch step peak MiB | within | learning rate "
        "(validation's) | test accuracy | test loss |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for (task, label), (lr, runs) in sorted(best.items()):
        peak, within = _peak(runs), _within(runs)
        losses = [r["test_loss"] for r in runs if "test_loss" in r]
        accuracy = [r["test_accuracy"] for r in runs]
        lines.append(
            f"| {task} | {label} | {_plan(runs)} | {'' if peak is None else f'{peak:,.0f}'} | "
            f"{'' if within is None else ('yes' if within else 'NO')} | {lr:g} | "
            f"{100 * mean(accuracy):.1f} ± {100 * std(accuracy):.1f} ({len(runs)}) | "
            f"{f'{mean(losses):.3f}' if len(losses) == len(runs) else ''} |"
        )
    return "\n".join(lines) + "\n"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    best = tuned(results)
    tasks = sorted({task for task, _ in best})
    verdicts = [_within(runs) for _, runs in best.values()]
    within = "every TraDy step within its peak budget" if all(v is not False for v in verdicts) else "NOT within"
    parts = [within]
    for task in tasks:
        cells = {label: runs for (t, label), (_, runs) in best.items() if t == task}
        shown = [  # "TraDy at <budget>" and "LoRA ..., checkpointing", TraDy first
            f"{'TraDy at ' + label.split(' at ')[-1] if label.startswith('TraDy') else label} "
            f"{100 * mean(r['test_accuracy'] for r in runs):.1f}%"
            for label, runs in sorted(cells.items(), key=lambda kv: not kv[0].startswith("TraDy"))
            if label.startswith("TraDy") or label.endswith("checkpointing")
        ]
        parts.append(f"{task}: " + ", ".join(shown))
    return "; ".join(parts)


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    lines = [f"# {experiment['name']}", "", experiment.get("description", ""), "", docs_table(experiment, results)]
    lines += ["", "Every learning rate measured (mean validation / test accuracy over seeds):", ""]
    lines += ["| task | method | learning rate | validation | test |", "| --- | --- | ---: | ---: | ---: |"]
    for (task, label, lr), runs in sorted(_by_learning_rate(results).items()):
        lines.append(
            f"| {task} | {label} | {lr:g} | {100 * mean(r['validation_accuracy'] for r in runs):.1f} | "
            f"{100 * mean(r['test_accuracy'] for r in runs):.1f} |"
        )
    return "\n".join(lines) + "\n"

"""Does a budget on the whole training step (``TraDyConfig(peak_bytes=...)``) hold on a real model, and what does it
cost in quality?

``model``: ``smollm2`` (the default: the real SmolLM2-135M-Instruct in float32 on BBC News training windows, batch
``batch_size`` x ``seq_len`` tokens) or ``minilm`` (the real MiniLM classifying BBC News articles, batches of
``batch_size`` articles padded to ``seq_len`` tokens). AdamW. Reference: the measured peak of one plain full
fine-tuning step (no checkpointing) on the first batch.

``method: trady``: ``peak_budget`` is a share of that reference, or ``"smallest"``: the smallest peak TraDy reaches,
the value its refusal of ``refuse_at`` x the reference names. Calibration on the first ``calibration_batches``
batches plans the channel budget, the depth and gradient checkpointing; the measured peak of a step is then checked
for the first ``draws`` draws (each epoch re-samples the channels). With ``train``, TraDy then trains ``steps`` steps
at learning rate ``lr`` from its first draw. ``method: lora``: LoRA of rank ``lora_r`` given the same batch with and
without gradient checkpointing, trained as TraDy is. Both: held-out loss (token-weighted cross-entropy; MiniLM: mean
cross-entropy on ``4 * eval_windows`` test articles) on the first ``eval_windows`` test windows (``blocks``: only the
model's first blocks, for smoke runs). Targets: every measured peak within its budget; at 0.4x, TraDy's held-out loss
within 2% of LoRA's with checkpointing.
"""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path

import torch

from .smollm2_news import PROJECTIONS, batches, held_out_loss, news_windows, smollm2

VERSION = 1
MIB = 2**20
LOSS_TARGET = 1.02


def _minilm(s: dict):
    return s.get("model", "smollm2") == "minilm"


def _data(s: dict):
    """``(training batches, held-out rows)``."""
    if _minilm(s):
        from .trady_text import load_task, text_batch

        rows, tokenizer, _ = load_task("bbc_news", s["seq_len"], None)
        train = [
            text_batch(tokenizer, rows["train"][i : i + s["batch_size"]], s["seq_len"])
            for i in range(0, s["steps"] * s["batch_size"], s["batch_size"])
        ]
        test = [text_batch(tokenizer, rows["test"][i : i + 4]) for i in range(0, 4 * s["eval_windows"], 4)]
        return train, test
    train, _, test = news_windows(s["seq_len"], s["steps"] * s["batch_size"], s["eval_windows"])
    return batches(train, s["batch_size"]), test


def _base(s: dict):
    """The pretrained model in train mode (its first ``blocks`` blocks when given)."""
    if not _minilm(s):
        return smollm2(s.get("blocks"))
    from .trady_text import load_task, minilm_classifier

    model = minilm_classifier(0, load_task("bbc_news", s["seq_len"], None)[2])
    if s.get("blocks"):
        model.bert.encoder.layer = model.bert.encoder.layer[: s["blocks"]]
        model.config.num_hidden_layers = s["blocks"]
    return model.train()


def _targets(s: dict) -> dict:
    """The PEFT task type and target modules (MiniLM: TraDy's and LoRA's defaults)."""
    return {"task_type": "SEQ_CLS"} if _minilm(s) else {"task_type": "CAUSAL_LM", "target_modules": PROJECTIONS}


@torch.no_grad()
def _held_out_loss(s: dict, model, test) -> float:
    if not _minilm(s):
        return held_out_loss(model, test)
    model.eval()
    total = sum(float(model(**batch).loss) * len(batch["labels"]) for batch in test)
    model.train()
    return total / sum(len(batch["labels"]) for batch in test)


def _train(model, data: list[dict], lr: float) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()


def _trady_under(s: dict, limit: int, calibration: list[dict]):
    """TraDy planned for a step peak of ``limit`` bytes: ``(model, calibration summary, planning seconds)``."""
    from peft import get_peft_model

    from hf_collapse.trady import TraDyConfig, calibrate

    selection = s.get("selection", "rgn_weighted")  # what these runs were measured with (the default then)
    model = get_peft_model(_base(s), TraDyConfig(peak_bytes=limit, selection=selection, **_targets(s)))
    start = time.perf_counter()
    summary = calibrate(model, calibration)
    return model, summary, time.perf_counter() - start


def _smallest_feasible(s: dict, limit: int, calibration: list[dict]) -> tuple[int, str]:
    """The peak TraDy's refusal of ``limit`` names as the least it can meet, and the refusal."""
    from hf_collapse.trady import PeakBudgetError

    try:
        _trady_under(s, limit, calibration)
    except PeakBudgetError as refused:
        return int(re.search(r"at least ([\d,]+)", str(refused)).group(1).replace(",", "")), str(refused)
    raise RuntimeError(f"a peak budget of {limit:,} bytes was met: the smallest feasible one is lower")


def _run_trady(s: dict, data: list[dict], test: list[dict]) -> dict:
    from hf_collapse.trady import find_trady_model, step_memory

    calibration = data[: s["calibration_batches"]]
    full = step_memory(_base(s), data[0], method="full").peak_bytes
    gc.collect()
    result = {"full_peak_bytes": full}
    if s["peak_budget"] == "smallest":
        limit, result["refusal"] = _smallest_feasible(s, int(s["refuse_at"] * full), calibration)
    else:
        limit = int(s["peak_budget"] * full)
    model, summary, seconds = _trady_under(s, limit, calibration)
    tuner, plan = find_trady_model(model), summary["peak_plan"]
    peaks = []
    for draw in range(s["draws"]):
        if draw:
            tuner.resample(draw)
        peaks.append(step_memory(model, data[0]).peak_bytes)
    budget = tuner.budget_summary()
    result.update(
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
    if s["train"]:
        tuner.resample(0)  # back to the first draw, as a run starts
        _train(model, data, s["lr"])
        result["held_out_loss"] = _held_out_loss(s, model, test)
    return result


def _run_lora(s: dict, data: list[dict], test: list[dict]) -> dict:
    from peft import LoraConfig, get_peft_model

    from hf_collapse import compat
    from hf_collapse.trady import step_memory

    targets = _targets(s)
    if "target_modules" not in targets:
        from hf_collapse.trady.model import default_target_modules

        targets["target_modules"] = default_target_modules(_base(s))
    config = LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], lora_dropout=0.0, **targets)
    lora = get_peft_model(_base(s), config)
    plain = step_memory(lora, data[0]).peak_bytes
    compat.set_activation_checkpointing(lora.base_model.model, True)
    lora.base_model.model.enable_input_require_grads()  # LoRA's layers sit in every block: the input must need grads
    result = {"plain_peak_bytes": plain, "peak_bytes": step_memory(lora, data[0]).peak_bytes}
    _train(lora, data, s["lr"])
    result["held_out_loss"] = _held_out_loss(s, lora, test)
    return result


def run(s: dict) -> dict:
    from hf_collapse.metrics import hardware_description

    data, test = _data(s)
    result = _run_trady(s, data, test) if s["method"] == "trady" else _run_lora(s, data, test)
    return {"hardware": hardware_description("cpu"), **result}


def smoke(s: dict) -> dict:
    """The model's first 2 blocks, one 32-token window per batch, two steps, two windows to evaluate, one draw; every
    TraDy point becomes the smallest feasible budget, trained (the refusal, the planning, the draws and the training in
    one run)."""
    small = {**s, "blocks": 2, "seq_len": 32, "batch_size": 1, "steps": 2, "eval_windows": 2}
    if s["method"] == "trady":
        small.update(peak_budget="smallest", refuse_at=0.05, train=True, draws=1, calibration_batches=1)
    return small


# ------------------------------------------------------------------------------------------------ report


def _on(r: dict) -> str:
    return "on" if r["gradient_checkpointing"] else "off"


def _label(s: dict) -> str:
    return "smallest feasible" if s["peak_budget"] == "smallest" else f"{s['peak_budget']:g}x full"


def _trady_runs(results) -> list[tuple[dict, dict]]:
    runs = [(s, r) for s, r in results if s["method"] == "trady"]
    return sorted(runs, key=lambda sr: sr[1]["peak_budget_bytes"])


def _lora(results) -> dict | None:
    return next((r for s, r in results if s["method"] == "lora"), None)


def _trained(results) -> tuple[dict, dict] | None:
    return next(((s, r) for s, r in _trady_runs(results) if "held_out_loss" in r), None)


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    if part == "quality":
        return _quality_table(results)
    lines = [
        "| peak budget | MiB | channel budget (share of every channel) | depth | checkpointing | channels | "
        "plans measured | planning s | measured peaks, MiB | within |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for s, r in _trady_runs(results):
        depth = "any" if r["max_depth"] is None else f"last {r['max_depth']} projections"
        lines.append(
            f"| {_label(s)} | {r['peak_budget_bytes'] / MIB:,.0f} | {r['channel_budget_elements']:,.0f} "
            f"({r['channel_share']:.3f}) | {depth} | {_on(r)} | "
            f"{r['channels']:,} | {r['plans_measured']} | {r['planning_s']} | "
            f"{' / '.join(f'{p / MIB:,.0f}' for p in r['measured_peaks'])} | {'yes' if r['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def _quality_table(results) -> str:
    lines = ["| method | peak step MiB | held-out loss |", "| --- | ---: | ---: |"]
    trained, lora = _trained(results), _lora(results)
    if trained:
        s, r = trained
        lines.append(f"| TraDy at {_label(s)} | {max(r['measured_peaks']) / MIB:,.0f} | {r['held_out_loss']:.4f} |")
    if lora:
        lines.append(f"| LoRA, checkpointing | {lora['peak_bytes'] / MIB:,.0f} | {lora['held_out_loss']:.4f} |")
        lines.append(f"| LoRA, no checkpointing | {lora['plain_peak_bytes'] / MIB:,.0f} | |")
    return "\n".join(lines) + "\n"


def _loss_ratio(results) -> float | None:
    trained, lora = _trained(results), _lora(results)
    return trained[1]["held_out_loss"] / lora["held_out_loss"] if trained and lora else None


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    runs = _trady_runs(results)
    parts = []
    if runs:
        met = "within budget at every budget and draw" if all(r["met"] for _, r in runs) else "NOT within budget"
        full = runs[0][1]["full_peak_bytes"]
        shown = [
            f"{_label(s)}: {max(r['measured_peaks']) / MIB:,.0f} MiB = {max(r['measured_peaks']) / full:.2f}x"
            + (f", {r['channel_share']:.1%} channel budget, checkpointing {_on(r)}" if s["train"] else "")
            for s, r in runs
            if s["peak_budget"] == "smallest" or s["train"]
        ]
        parts.append(f"{met} ({'; '.join(shown)})")
    ratio = _loss_ratio(results)
    if ratio is not None:
        parts.append(f"test loss {ratio:.3f}x LoRA's at {_label(_trained(results)[0])}")
    return "; ".join(parts) or "not run yet"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    s, r = results[0]
    lines = [f"# {experiment['name']}", "", experiment.get("description", ""), ""]
    runs = _trady_runs(results)
    if runs:
        held = "met" if all(r["met"] for _, r in runs) else "NOT met"
        lines += [
            f"{r['hardware']}; batch {s['batch_size']} x {s['seq_len']} tokens. Full fine-tuning's step peak (float32, "
            f"no checkpointing): {runs[0][1]['full_peak_bytes'] / MIB:,.0f} MiB. Peak of a step measured by "
            f"`hf_collapse.trady.step_memory` for the first {runs[0][0]['draws']} draws of each plan.",
            "",
            docs_table(experiment, results),
            f"Peak within the budget for every budget and draw: {held}",
            "",
        ]
        refusal = next((r["refusal"] for _, r in runs if "refusal" in r), None)
        if refusal:
            lines += [f"The refusal that names the smallest feasible budget: {refusal}", ""]
    if _trained(results) or _lora(results):
        lines += [f"After {s['steps']} steps, held-out loss on {s['eval_windows']} test windows:", ""]
        lines.append(_quality_table(results))
    ratio = _loss_ratio(results)
    if ratio is not None:
        verdict = "met" if ratio <= LOSS_TARGET else "NOT met"
        lines.append(f"TraDy / LoRA held-out loss {ratio:.3f} (target <= {LOSS_TARGET}): {verdict}")
    return "\n".join(lines) + "\n"

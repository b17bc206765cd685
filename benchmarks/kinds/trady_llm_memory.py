"""How much of a training step's memory does TraDy save on a real decoder LM, and at what held-out loss?

The real SmolLM2-135M-Instruct (float32) fine-tuned on BBC News training windows of ``seq_len`` tokens: ``steps``
AdamW steps of ``batch_size`` windows, the same windows in the same order for every method; held-out loss
(token-weighted cross-entropy) on the first ``eval_windows`` windows of the test split, before and after. Settings:
``method`` (``full``: full fine-tuning; ``lora``: peft LoRA of rank ``lora_r`` on every q/k/v/o/gate/up/down
projection; ``trady``: TraDy at ``budget_ratio`` of every channel's cost on the same projections, calibrated on the
first ``calibration_batches`` batches, only the last ``max_depth`` projections when it is set), ``lr``, ``seed``,
``blocks`` (only the first decoder blocks of SmolLM2: smoke runs; absent: all 30).

Measured: the peak of one steady-state training step on the first batch (``hf_collapse.trady.step_memory``: the
profiler's allocation events on CPU, ``max_memory_allocated`` on CUDA) and its breakdown, the median step time of
the training loop (a shared machine: noisy), the held-out loss. Targets: TraDy's peak at most 0.4x full
fine-tuning's and below LoRA's, its held-out loss within 5% of LoRA's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .smollm2_news import PROJECTIONS, batches, held_out_loss, news_windows, smollm2

VERSION = 1
TIMED = True  # the step time
MIB = 2**20


def label(s: dict) -> str:
    """``full``, ``lora``, ``trady`` or ``trady, max_depth N``."""
    return f"trady, max_depth {s['max_depth']}" if s["method"] == "trady" and s.get("max_depth") else s["method"]


def build(s: dict, calibration_batches: list[dict]):
    """``(model, info)``: SmolLM2 prepared for ``s["method"]`` (TraDy calibrated on ``calibration_batches``), in
    train mode; ``info`` says what TraDy's calibration chose and how long it took."""
    from peft import LoraConfig, get_peft_model

    from hf_collapse.trady import TraDyConfig, calibrate, find_trady_model

    model, info = smollm2(s.get("blocks")), {}
    if s["method"] == "lora":
        config = LoraConfig(
            r=s["lora_r"],
            lora_alpha=2 * s["lora_r"],
            lora_dropout=0.0,
            target_modules=PROJECTIONS,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif s["method"] == "trady":
        config = TraDyConfig(
            task_type="CAUSAL_LM",
            budget_ratio=s["budget_ratio"],
            target_modules=PROJECTIONS,
            seed=s["seed"],
            max_depth=s.get("max_depth"),
            selection=s.get("selection", "trady"),  # what these runs were measured with (the default then)
        )
        model = get_peft_model(model, config)
        start = time.perf_counter()
        summary = calibrate(model, calibration_batches)
        tuner = find_trady_model(model)
        budget = tuner.budget_summary()
        info = {
            "calibration_s": round(time.perf_counter() - start, 1),
            "selected_layers": len(summary["selected_layers"]),
            "channels": budget["channels"],
            "layers_with_channels": budget["layers_with_channels"],
            "lowest_layer": next(iter(tuner.current_selection()), None),
        }
    elif s["method"] != "full":
        raise ValueError(f"unknown method {s['method']!r}")
    return model.train(), info


def run(s: dict) -> dict:
    from hf_collapse.metrics import hardware_description
    from hf_collapse.trady import step_memory

    train, _, test = news_windows(s["seq_len"], s["steps"] * s["batch_size"], s["eval_windows"])
    data = batches(train, s["batch_size"])
    torch.manual_seed(s["seed"])
    model, info = build(s, data[: s.get("calibration_batches", 0)])
    before = held_out_loss(model, test)  # every method starts from the same function
    memory = step_memory(model, data[0], method=s["method"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s["lr"], weight_decay=0.0)
    times, losses = [], []
    for batch in data:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "hardware": hardware_description(model),
        "trainable_elements": sum(p.numel() for p in trainable),
        **info,
        "peak_bytes": memory.peak_bytes,
        "parameter_bytes": memory.parameter_bytes,
        "gradient_bytes": memory.gradient_bytes,
        "optimizer_state_bytes": memory.optimizer_state_bytes,
        "activation_bytes": memory.activation_bytes,
        "saved_for_backward_bytes": memory.saved_for_backward_bytes,
        "peak_phase": memory.peak_phase,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "train_loss_first": losses[0],
        "train_loss_last5": statistics.mean(losses[-5:]),
        "held_out_loss_before": before,
        "held_out_loss": held_out_loss(model, test),
    }


def smoke(s: dict) -> dict:
    """SmolLM2's first 2 blocks, two steps of one 32-token window, two windows to evaluate, one calibration batch."""
    small = {**s, "blocks": 2, "steps": 2, "batch_size": 1, "seq_len": 32, "eval_windows": 2}
    return {**small, "calibration_batches": 1} if s["method"] == "trady" else small


# ------------------------------------------------------------------------------------------------ report


def _by_label(results) -> dict[str, tuple[dict, dict]]:
    return {label(s): (s, r) for s, r in results}


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    lines = [
        "| method | lr | trainable | peak step MiB | params | grads | optimizer state | activations+temp | "
        "saved for backward | step s | held-out loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (s, r) in _by_label(results).items():
        lines.append(
            f"| {name} | {s['lr']:g} | {r['trainable_elements']:,} | {r['peak_bytes'] / MIB:,.0f} | "
            f"{r['parameter_bytes'] / MIB:,.0f} | {r['gradient_bytes'] / MIB:,.1f} | "
            f"{r['optimizer_state_bytes'] / MIB:,.1f} | {r['activation_bytes'] / MIB:,.0f} | "
            f"{r['saved_for_backward_bytes'] / MIB:,.0f} | {r['step_s']:.2f} | {r['held_out_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _ratios(results) -> list[tuple[str, dict]]:
    """For every TraDy run: its peak over full fine-tuning's and LoRA's, its held-out loss over LoRA's (the ratios
    whose reference is not run yet left out)."""
    runs = _by_label(results)
    full, lora = runs.get("full", (None, None))[1], runs.get("lora", (None, None))[1]
    rows = []
    for name, (s, r) in runs.items():
        if s["method"] == "trady":
            ratios = {}
            if full:
                ratios["peak_over_full"] = r["peak_bytes"] / full["peak_bytes"]
            if lora:
                ratios["peak_over_lora"] = r["peak_bytes"] / lora["peak_bytes"]
                ratios["loss_over_lora"] = r["held_out_loss"] / lora["held_out_loss"]
            rows.append((name, ratios))
    return rows


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    parts = []
    for name, ratios in _ratios(results):
        shown = [f"peak {ratios['peak_over_full']:.2f}x full"] if "peak_over_full" in ratios else []
        if "peak_over_lora" in ratios:
            shown += [f"{ratios['peak_over_lora']:.2f}x LoRA", f"test loss {ratios['loss_over_lora'] - 1:+.1%} vs LoRA"]
        parts.append(f"{name}: " + ", ".join(shown))
    return "; ".join(parts) or "no TraDy run yet"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    s, r = results[0]
    lines = [
        f"# {experiment['name']}",
        "",
        experiment.get("description", ""),
        "",
        f"{r['hardware']}; {s['steps']} AdamW steps of {s['batch_size']} x {s['seq_len']} tokens; held-out loss on "
        f"{s['eval_windows']} test windows, {r['held_out_loss_before']:.4f} before fine-tuning. Peak: one steady-state "
        "step on the first batch (`hf_collapse.trady.step_memory`); step time: median of the training loop.",
        "",
        docs_table(experiment, results),
    ]
    for name, (_, run) in _by_label(results).items():
        if "channels" in run:
            lines.append(
                f"- {name}: {run['channels']:,} channels in {run['layers_with_channels']} layers (lowest "
                f"`{run['lowest_layer']}`), calibration {run['calibration_s']} s"
            )
    lines.append("")
    targets = {"peak_over_full": 0.4, "peak_over_lora": 1.0, "loss_over_lora": 1.05}
    words = {"peak_over_full": "peak / full FT's", "peak_over_lora": "peak / LoRA's", "loss_over_lora": "loss / LoRA's"}
    for name, ratios in _ratios(results):
        for key, value in ratios.items():
            met = value < 1.0 if key == "peak_over_lora" else value <= targets[key]
            bound = "< 1" if key == "peak_over_lora" else f"<= {targets[key]}"
            lines.append(f"- {name}: {words[key]} {value:.3f} (target {bound}): {'met' if met else 'NOT met'}")
    return "\n".join(lines) + "\n"

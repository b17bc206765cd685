"""The GPU lane in one command: every method end to end on CUDA, each check printed pass / fail.

On the real all-MiniLM-L6-v2 and the embedded dialog topics (a few hundred examples, a few steps), and the real
SmolLM2-135M on BBC News text, so that the whole lane takes a few minutes on one GPU:

* LaCoOT: ``LaCoOTTrainer`` trains, scores and collapses on the GPU; ``save_model`` publishes the collapsed model,
  which plain ``from_pretrained`` reloads to the same outputs; a run resumed from a checkpoint ends where the
  uninterrupted one does;
* TLC: ``tlc.compress`` (statistics, calibration losses, fine-tuning) runs with the model on the GPU, and
  ``AutoCollapsedModel`` reloads the result exactly;
* TraDy: ``get_peft_model`` + a plain ``Trainer`` (calibrating itself) trains TraDy channels on the GPU, and the
  saved adapter reloads exactly with ``PeftModel.from_pretrained``;
* SmolLM2: a LaCoOTTrainer step against a plain Trainer step (target <= 1.15x); generation tokens/s with 8 of 30
  blocks removed against the intact model (target >= 0.9x the depth ratio), the pruned model reloaded by plain
  ``from_pretrained``; the peak memory of a training step (``torch.cuda.max_memory_allocated``) of TraDy at 5%,
  LoRA r=8 and full fine-tuning.

    python benchmarks/gpu_check.py                 # on a machine with CUDA; exits 1 if a check fails
    python benchmarks/gpu_check.py --allow-cpu     # the same lane on the CPU (slow; to test the script itself)

Writes what it printed to ``benchmarks/results/gpu_check.txt`` when it ran on CUDA.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import torch


def _task(train_size: int, eval_size: int):
    from hf_collapse.data import prepare_task

    model, data, tokenizer, collator = prepare_task("minilm", "dialog_topics")
    train = data["train"].shuffle(seed=0).select(range(min(train_size, len(data["train"]))))
    test = data["test"].select(range(min(eval_size, len(data["test"]))))
    return model, train, test, tokenizer, collator


def _outputs(model, tokenizer, device) -> torch.Tensor:
    batch = tokenizer(
        ["where is the nearest bank", "tell me a joke about computers"], padding=True, return_tensors="pt"
    ).to(device)
    with torch.no_grad():
        return model.to(device).eval()(**batch).logits.float().cpu()


def check_lacoot(args, folder: Path) -> str:
    from transformers import AutoModelForSequenceClassification

    from hf_collapse import LaCoOTArguments, LaCoOTTrainer
    from hf_collapse.data.tasks import accuracy

    model, train, test, tokenizer, collator = _task(args.train_size, args.eval_size)

    def trainer_for(out: Path, **overrides):
        settings = dict(
            output_dir=str(out),
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            max_steps=args.steps,
            learning_rate=2e-4,
            msw_weight=0.1,
            report_to=[],
            disable_tqdm=True,
            save_strategy="steps",
            save_steps=args.steps // 2,
            use_cpu=args.device == "cpu",
            seed=0,
        )
        settings.update(overrides)
        return LaCoOTTrainer(
            model=model if not overrides.get("fresh") else _task(1, 1)[0],
            args=LaCoOTArguments(**{k: v for k, v in settings.items() if k != "fresh"}),
            train_dataset=train,
            eval_dataset=test,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=accuracy,
        )

    trainer = trainer_for(folder / "run")
    trainer.train()
    on_device = next(trainer.model.parameters()).device.type
    assert on_device == args.device, f"trained on {on_device}, expected {args.device}"
    collapsed, report = trainer.collapse(num_units=2, latency_repeats=5)
    assert report.after.removed == 2 and collapsed.config.num_hidden_layers == 4
    trainer.save_model(str(folder / "collapsed"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder / "collapsed")
    error = float(
        (_outputs(reloaded, tokenizer, args.device) - _outputs(collapsed, tokenizer, args.device)).abs().max()
    )
    assert error <= 1e-4, f"plain reload differs by {error:.2e}"

    resumed = trainer_for(folder / "resumed", fresh=True)
    resumed.train(resume_from_checkpoint=str(folder / "run" / f"checkpoint-{args.steps // 2}"))
    drift = max(
        float((a.float() - b.float()).abs().max())
        for a, b in zip(trainer.model.state_dict().values(), resumed.model.state_dict().values())
    )
    assert drift <= 1e-4, f"resumed run ends {drift:.2e} away from the uninterrupted one"
    return (
        f"2 blocks removed, {report.metric_name} {report.before.metric:.3f} -> {report.after.metric:.3f}; "
        f"reload error {error:.1e}; resume drift {drift:.1e}"
    )


def check_tlc(args, folder: Path) -> str:
    from transformers import TrainingArguments

    import hf_collapse
    from hf_collapse.data.tasks import accuracy

    model, train, test, tokenizer, collator = _task(args.train_size, args.eval_size)
    training = TrainingArguments(
        str(folder / "tlc"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        report_to=[],
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        learning_rate=2e-4,
    )
    model.to(training.device)
    config = hf_collapse.TLCConfig(num_units=2, finetune_steps=4, calibration_batches=2)
    compressed, report = hf_collapse.tlc.compress(
        model, config, train, test, training, data_collator=collator, compute_metrics=accuracy
    )
    assert len(report.removed) == 2, report.removed
    compressed.save_pretrained(folder / "compressed")
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(folder / "compressed")
    error = float(
        (_outputs(reloaded, tokenizer, args.device) - _outputs(compressed, tokenizer, args.device)).abs().max()
    )
    assert error <= 1e-4, f"AutoCollapsedModel reload differs by {error:.2e}"
    return f"2 activation layers collapsed, {report.metric_name} {report.after.metric:.3f}; reload error {error:.1e}"


def check_trady(args, folder: Path) -> str:
    from peft import PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    import hf_collapse

    model, train, test, tokenizer, collator = _task(args.train_size, args.eval_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "encoder" in n}
    peft_model = get_peft_model(model, hf_collapse.TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    training = TrainingArguments(
        str(folder / "trady"),
        per_device_train_batch_size=16,
        max_steps=args.steps,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=args.device == "cpu",
    )
    Trainer(
        model=peft_model,
        args=training,
        train_dataset=train,
        data_collator=collator,
        callbacks=[hf_collapse.TraDyCallback()],
    ).train()
    peft_model.save_pretrained(folder / "adapter")
    merged = peft_model.merge_and_unload()
    changed = sum(
        int(not torch.equal(before[n].cpu(), p.detach().cpu())) for n, p in merged.named_parameters() if n in before
    )
    assert changed > 0, "no encoder weight changed: only the head was trained"
    again = PeftModel.from_pretrained(_task(1, 1)[0], folder / "adapter").merge_and_unload()
    error = float((_outputs(again, tokenizer, args.device) - _outputs(merged, tokenizer, args.device)).abs().max())
    assert error <= 1e-4, f"adapter reload differs by {error:.2e}"
    return f"{changed} encoder tensors updated under a 5% budget; adapter reload error {error:.1e}"


def _smollm2(args, windows: int, window: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_collapse.data import embedded_model_path, lm_windows, load_bbc_news

    folder = embedded_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return (
        model,
        tokenizer,
        lm_windows(load_bbc_news()["train"]["text"], tokenizer, max_length=window, max_windows=windows),
    )


class _StepTimes:
    """A TrainerCallback that records the wall time of each training step (synchronising the device first)."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                outer._sync()
                outer.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                outer._sync()
                outer.times.append(time.perf_counter() - outer.start)

        self.device, self.times, self.start, self.callback = device, [], 0.0, Callback()

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def median(self, skip: int) -> float:
        kept = sorted(self.times[skip:])
        return kept[len(kept) // 2]


def check_lacoot_overhead_llm(args, folder: Path) -> str:
    """A LaCoOTTrainer step against a plain Trainer step on SmolLM2 (batch 8 x 256 tokens, bf16 on CUDA): the
    penalty's cost, median step times after warm-up, the two runs one after the other on the same device."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_collapse import LaCoOTArguments, LaCoOTTrainer

    steps, warmup = args.llm_steps, 3
    model, _, train = _smollm2(args, windows=8 * (steps + warmup), max_length=256)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    medians = {}
    for name, (trainer_class, args_class, extra) in {
        "Trainer": (Trainer, TrainingArguments, {}),
        "LaCoOTTrainer": (LaCoOTTrainer, LaCoOTArguments, {"msw_weight": 1e-4}),
    }.items():
        model.load_state_dict(state)
        timer = _StepTimes(args.device)
        training = args_class(
            str(folder / name),
            per_device_train_batch_size=8,
            max_steps=steps + warmup,
            learning_rate=1e-5,
            bf16=args.device == "cuda",
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            use_cpu=args.device == "cpu",
            seed=0,
            **extra,
        )
        trainer_class(
            model=model,
            args=training,
            train_dataset=train,
            data_collator=default_data_collator,
            callbacks=[timer.callback],
        ).train()
        medians[name] = timer.median(warmup)
    ratio = medians["LaCoOTTrainer"] / medians["Trainer"]
    assert ratio <= 1.15, f"LaCoOT step {ratio:.2f}x a Trainer step (target <= 1.15x)"
    return (
        f"step {medians['Trainer'] * 1e3:.0f} ms -> {medians['LaCoOTTrainer'] * 1e3:.0f} ms with the penalty on "
        f"30 blocks: x{ratio:.3f} (target <= 1.15)"
    )


def check_generation_llm(args, folder: Path) -> str:
    """Greedy generation with the KV cache, SmolLM2 intact vs 8 of 30 blocks removed (block influence on BBC text),
    timed side by side; the collapsed model saved, reloaded with plain from_pretrained, generating the same tokens."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    import hf_collapse
    from hf_collapse.commands.prune import generation_speed

    model, tokenizer, windows = _smollm2(args, windows=16, max_length=128)
    model = model.to(args.device).eval()
    scores = hf_collapse.score_blocks(
        model, DataLoader(windows, batch_size=8), method="block_influence", progress=False
    )
    pruned = hf_collapse.remove_blocks(model, sorted(scores, key=scores.get)[:8])
    prompt = {k: v[:1, :32].to(args.device) for k, v in windows[:1].items() if k != "labels"}
    intact, smaller = generation_speed([model, pruned], prompt, new_tokens=64, rounds=5)
    pruned.save_pretrained(folder / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "pruned").to(args.device).eval()
    greedy = dict(max_new_tokens=16, do_sample=False)
    assert torch.equal(reloaded.generate(**prompt, **greedy), pruned.generate(**prompt, **greedy)), (
        "the reloaded model generates other tokens"
    )
    speedup, depth_ratio = smaller / intact, 30 / 22
    assert speedup >= 0.9 * depth_ratio, f"x{speedup:.2f} is below 0.9 x the depth ratio {depth_ratio:.2f}"
    return (
        f"{intact:.0f} -> {smaller:.0f} tokens/s (x{speedup:.2f}, depth ratio x{depth_ratio:.2f}); reload "
        "generates the same tokens"
    )


def check_peak_memory_llm(args, folder: Path) -> str:
    """Peak memory of one training step of SmolLM2 (batch 2 x 256 tokens) from ``torch.cuda.max_memory_allocated``
    (``hf_collapse.trady.step_memory``): full fine-tuning, LoRA r=8 and TraDy at a 5% budget, built as the
    ``trady_llm_memory`` benchmark kind builds them (the same projections)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kinds.trady_llm_memory import build

    from hf_collapse.trady import step_memory

    _, _, windows = _smollm2(args, windows=8, max_length=256)
    batches = [dict(windows[i : i + 2]) for i in range(0, 8, 2)]  # TraDy calibrates on these (CPU), then moves
    peaks = {}
    for method in ("full", "lora", "trady"):
        settings = {"method": method, "lora_r": 8, "budget_ratio": 0.05, "seed": 0}
        model = build(settings, batches)[0].to(args.device)
        peaks[method] = step_memory(model, {k: v.to(args.device) for k, v in batches[0].items()}).peak_bytes
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    full, lora, trady = (peaks[m] / 2**20 for m in ("full", "lora", "trady"))
    assert trady < lora < full, f"peak MiB: full {full:.0f}, LoRA {lora:.0f}, TraDy {trady:.0f}"
    return (
        f"peak step MiB: full {full:.0f}, LoRA r=8 {lora:.0f}, TraDy 5% {trady:.0f} "
        f"({trady / full:.2f}x full, {trady / lora:.2f}x LoRA; target <= 0.4x full, below LoRA)"
    )


CHECKS: dict[str, Callable] = {
    "LaCoOT train + collapse + save + resume": check_lacoot,
    "TLC compress + reload": check_tlc,
    "TraDy train + adapter reload": check_trady,
    "SmolLM2: LaCoOT step overhead": check_lacoot_overhead_llm,
    "SmolLM2: tokens/s with 8 of 30 blocks removed": check_generation_llm,
    "SmolLM2: peak step memory, TraDy vs LoRA vs full": check_peak_memory_llm,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when CUDA is absent")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--llm-steps", type=int, default=10, help="timed training steps on SmolLM2 per trainer")
    parser.add_argument("--only", nargs="+", help="run only the checks whose name contains one of these words")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gpu_check.txt"))
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.allow_cpu:
        print("no CUDA device: run this on a GPU machine, or pass --allow-cpu to exercise the lane on the CPU")
        return 2
    from hf_collapse.metrics import hardware_description

    lines = [
        f"hf_collapse GPU lane on {hardware_description(args.device)}, torch {torch.__version__}",
        "",
        "| check | result | seconds | details |",
        "| --- | --- | ---: | --- |",
    ]
    print("\n".join(lines), flush=True)
    failures = 0
    checks = {
        name: check
        for name, check in CHECKS.items()
        if not args.only or any(word.lower() in name.lower() for word in args.only)
    }
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
                details = check(args, Path(tmp))
            result = "pass"
        except Exception as error:  # report every check, then fail the command
            failures += 1
            result, details = "FAIL", f"{type(error).__name__}: {error}"
            traceback.print_exc(file=sys.stderr)
        line = f"| {name} | {result} | {time.perf_counter() - start:.0f} | {details} |"
        lines.append(line)
        print(line, flush=True)
    summary = f"\n{len(checks) - failures} passed, {failures} failed"
    lines.append(summary)
    print(summary)
    if args.device == "cuda":
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

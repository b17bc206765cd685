"""Cost of the LaCoOT penalty: one training step of LaCoOTTrainer against a plain Trainer step.

Same model (the real pretrained MiniLM with a classification head), same batch of real dialog lines; the two
trainers' steps are interleaved so machine noise hits both. Target (issue 3): at most 1.25x.

    python benchmarks/bench_lacoot_overhead.py [--batch 32 --max-length 64 --repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_collapse import LaCoOTArguments, LaCoOTTrainer
from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset
from hf_collapse.metrics import hardware_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ascent-steps", type=int, default=None, help="default: LaCoOTArguments' default")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_lacoot_overhead.json"))
    args = parser.parse_args()

    path = embedded_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tokenize_text_dataset(load_dialog_topics(), tokenizer, max_length=args.max_length)["train"]
    batch = DataCollatorWithPadding(tokenizer)([data[i] for i in range(args.batch)])
    batch["labels"] = batch.pop("label") if "label" in batch else batch["labels"]

    trainers = {}
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, report_to=[], use_cpu=True, learning_rate=1e-5, disable_tqdm=True)
        extra = {} if args.ascent_steps is None else {"msw_ascent_steps": args.ascent_steps}
        for name, trainer_cls, arguments in (
            ("plain", Trainer, TrainingArguments(**common)),
            ("lacoot", LaCoOTTrainer, LaCoOTArguments(**common, msw_weight=1.0, **extra)),
        ):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=19)
            trainer = trainer_cls(model=model, args=arguments)
            trainer.create_optimizer_and_scheduler(num_training_steps=1000)
            trainer.current_gradient_accumulation_steps = 1  # set by train(); we call training_step directly
            trainers[name] = trainer

        def step(trainer) -> float:
            start = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            return time.perf_counter() - start

        times = {name: [] for name in trainers}
        for i in range(args.repeats + 2):  # two warm-up rounds, then interleaved timing
            for name, trainer in trainers.items():
                elapsed = step(trainer)
                if i >= 2:
                    times[name].append(elapsed)

    plain, lacoot = statistics.median(times["plain"]), statistics.median(times["lacoot"])
    blocks = len(trainers["lacoot"].msw_blocks)
    ascent_steps = trainers["lacoot"].args.msw_ascent_steps
    result = {
        "model": "all-MiniLM-L6-v2 + classification head",
        "batch": args.batch,
        "tokens": int(batch["input_ids"].shape[1]),
        "blocks_penalized": blocks,
        "msw_ascent_steps": ascent_steps,
        "hardware": hardware_description(),
        "plain_step_s": round(plain, 4),
        "lacoot_step_s": round(lacoot, 4),
        "ratio": round(lacoot / plain, 3),
        "target": "<= 1.25",
    }
    print(
        f"training step, batch {args.batch} x {result['tokens']} tokens, {blocks} blocks penalized, "
        f"{ascent_steps} ascent steps, on {result['hardware']}"
    )
    print(f"  plain Trainer  {plain * 1e3:8.1f} ms")
    print(f"  LaCoOTTrainer  {lacoot * 1e3:8.1f} ms")
    print(f"  ratio {lacoot / plain:.3f} (target <= 1.25)")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

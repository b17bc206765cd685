"""Cost of the LaCoOT penalty: one training step of LaCoOTTrainer against a plain Trainer step.

The same model (the real pretrained MiniLM, the embedded ``minilm``, with a ``num_labels``-way classification head,
initialised with torch seed ``seed``) and the same batch (the first ``batch`` training lines of the embedded
``dialog_topics``, truncated to ``max_length`` tokens and padded to the longest) for both; LaCoOT penalises every block
with ``msw_weight`` and ``msw_ascent_steps``. A step is ``training_step`` + the optimizer's step (AdamW at
``learning_rate``); the two trainers' steps are interleaved, ``warmup`` discarded rounds and then ``repeats`` timed
ones, so that machine noise hits both. Target (issue 3): a median LaCoOT step at most 1.25x the plain step's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

VERSION = 1
TARGET = 1.25


def _batch(s: dict) -> dict:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    data = tokenize_text_dataset(load_dialog_topics(), tokenizer, max_length=s["max_length"])["train"]
    batch = DataCollatorWithPadding(tokenizer)([data[i] for i in range(s["batch"])])
    batch["labels"] = batch.pop("label") if "label" in batch else batch["labels"]
    return batch


def _trainers(s: dict, folder: str) -> dict:
    """``{"plain": Trainer, "lacoot": LaCoOTTrainer}`` on identical models, ready for ``training_step``."""
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from hf_collapse import LaCoOTArguments, LaCoOTTrainer
    from hf_collapse.data import embedded_model_path

    common = dict(output_dir=folder, report_to=[], use_cpu=True, learning_rate=s["learning_rate"], disable_tqdm=True)
    lacoot = dict(msw_weight=s["msw_weight"], msw_ascent_steps=s["msw_ascent_steps"])
    trainers = {}
    for name, trainer_cls, arguments in (
        ("plain", Trainer, TrainingArguments(**common)),
        ("lacoot", LaCoOTTrainer, LaCoOTArguments(**common, **lacoot)),
    ):
        torch.manual_seed(s["seed"])
        path = embedded_model_path("minilm")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=s["num_labels"])
        trainer = trainer_cls(model=model, args=arguments)
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is called directly
        trainers[name] = trainer
    return trainers


def _step(trainer, batch: dict) -> float:
    start = time.perf_counter()
    trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start


def run(s: dict) -> dict:
    from hf_collapse.metrics import hardware_description

    batch = _batch(s)
    with tempfile.TemporaryDirectory() as folder:
        trainers = _trainers(s, folder)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for i in range(s["warmup"] + s["repeats"]):  # interleaved; the first `warmup` rounds are discarded
            for name, trainer in trainers.items():
                elapsed = _step(trainer, batch)
                if i >= s["warmup"]:
                    times[name].append(elapsed)
    plain, lacoot = statistics.median(times["plain"]), statistics.median(times["lacoot"])
    return {
        "tokens": int(batch["input_ids"].shape[1]),
        "blocks_penalized": len(trainers["lacoot"].msw_blocks),
        "hardware": hardware_description(),
        "plain_step_s": round(plain, 4),
        "lacoot_step_s": round(lacoot, 4),
        "ratio": round(lacoot / plain, 3),
    }


def smoke(s: dict) -> dict:
    return {**s, "batch": 4, "max_length": 16, "repeats": 1, "warmup": 0}


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    lines = [
        "| batch | blocks penalized (ascent steps) | hardware | plain Trainer step | LaCoOTTrainer step | ratio |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for s, r in results:
        lines.append(
            f"| {s['batch']} x {r['tokens']} tokens | {r['blocks_penalized']} ({s['msw_ascent_steps']}) | "
            f"{r['hardware']} | {r['plain_step_s'] * 1e3:.1f} ms | {r['lacoot_step_s'] * 1e3:.1f} ms | "
            f"{r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    return f"{results[0][1]['ratio']:.2f}x"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    ratio = results[0][1]["ratio"]
    verdict = "met" if ratio <= TARGET else "missed"
    return (
        f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n{docs_table(experiment, results)}\n"
        f"Target: a LaCoOT step <= {TARGET}x a plain step -> {ratio:.3f} ({verdict}).\n"
    )

"""What the SmolLM2-135M depth benchmarks share (the ``llm_depth`` and ``llama_cpp`` kinds, and
``benchmarks/vllm_decilm_check.py``): the embedded model, a removal rebuilt from the names of the units it removed,
and training heals on a wall-time budget (the healing budget is time, not steps)."""

from __future__ import annotations

import copy
import functools
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments  # noqa: E402

import hf_collapse  # noqa: E402
from hf_collapse.data import embedded_model_path  # noqa: E402

#: Training heals: LoRA (r = 16 on every linear of the kept blocks) needs a larger step than full-parameter
#: distillation (pure KL to the original's logits, temperature 2); "lora-distill" is LoRA whose loss is that KL.
HEAL_SETTINGS = {
    "lora": dict(learning_rate=5e-4, r=16),
    "lora-distill": dict(learning_rate=5e-4, r=16, distill_alpha=1.0),
    "distill": dict(learning_rate=5e-5, alpha=1.0, temperature=2.0),
}


@functools.lru_cache(maxsize=1)
def smollm2(name: str = "smollm2"):
    """``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct (float32, eval mode); never modified by the kinds
    (every removal and heal works on a copy)."""
    folder = embedded_model_path(name)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def rebuild_removal(model, units: list[str]):
    """A copy of ``model`` with ``units`` (blocks or sub-layers, by their original names, in removal order, as a
    search's report lists them) removed one after another."""
    depth = model.config.num_hidden_layers
    smaller, alive = copy.deepcopy(model), [f"model.layers.{i}" for i in range(depth)]
    for unit in units:
        for name in [u.strip() for u in unit.split(",")]:
            block = ".".join(name.split(".")[:3])
            current = f"model.layers.{alive.index(block)}" + name[len(block) :]
            smaller = hf_collapse.remove_blocks(smaller, [current])
            if name == block:
                alive.remove(block)
    return smaller


class TimeBudget(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed; ``steps`` is how many optimizer steps it made."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.steps = seconds, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def training_arguments(folder: str, learning_rate: float) -> TrainingArguments:
    """Training stops on the time budget, so the schedule cannot depend on a step count: constant after warm-up
    (AdamW, batch 4, seed 0)."""
    return TrainingArguments(
        folder,
        max_steps=100_000,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )


def train_heal(student, teacher, dataset, kind: str, minutes: float) -> tuple[torch.nn.Module, int]:
    """``student`` healed by ``kind`` (a key of :data:`HEAL_SETTINGS`) on ``dataset`` for ``minutes`` of wall time:
    ``(healed model, optimizer steps made)``. LoRA learns from the text's tokens (no teacher), the distillations from
    ``teacher``'s logits."""
    settings = dict(HEAL_SETTINGS[kind])
    budget = TimeBudget(60 * minutes)
    with tempfile.TemporaryDirectory(prefix="heal_") as folder:
        healed = hf_collapse.heal(
            student,
            None if kind == "lora" else teacher,
            dataset,
            method=kind.partition("-")[0],  # lora-distill: LoRA with the distillation loss
            args=training_arguments(folder, settings.pop("learning_rate")),
            callbacks=[budget],
            **settings,
        )
    return healed.eval(), budget.steps

"""LoRA fine-tuning of the kept blocks with peft, merged back into a plain model (the ``"lora"`` method), on the
task's own loss or distilling the uncollapsed teacher (``distill_alpha``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import Trainer

from ..architectures.base import unwrap_model
from ..surgery import find_blocks
from .base import HealingMethod

__all__ = ["LoRA", "kept_block_linears", "lora"]


def kept_block_linears(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """Paths (in the transformers model) of the ``nn.Linear`` modules inside ``model``'s blocks.

    ``target_modules`` keeps only those whose path ends with one of the given names (``["q_proj", "v_proj"]``).
    """
    inner = unwrap_model(model)
    found = []
    for block in find_blocks(inner):
        prefix = block.name  # a path in `inner` itself, found on it
        for name, module in inner.get_submodule(block.name).named_modules():
            if isinstance(module, nn.Linear) and name:
                if target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules):
                    found.append(f"{prefix}.{name}" if prefix else name)
    if not found:
        raise ValueError(
            f"no nn.Linear inside the blocks of this {type(inner).__name__} matches target_modules="
            f"{list(target_modules) if target_modules is not None else None}"
        )
    return found


def lora(
    student: nn.Module,
    train_dataset,
    args,
    *,
    r: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.0,
    temperature: float = 2.0,
    **trainer_kwargs: Any,
) -> nn.Module:
    """Fine-tune LoRA adapters on the linears of ``student``'s blocks with a ``Trainer``, then merge them.

    With ``distill_alpha > 0`` the loss is :class:`~hf_collapse.healing.DistillationTrainer`'s, ``distill_alpha *
    KL(teacher || student) + (1 - distill_alpha) * task loss`` at ``temperature``: the adapters learn the
    uncollapsed ``teacher``'s whole next-token distribution rather than the healing text's tokens alone (1.0: the KL
    only). ``student`` is changed in place (:func:`hf_collapse.heal` passes a copy); the merged model is a plain model
    of the student's class, with its config (and ``hf_collapse`` record) as they were.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"the LoRA rank r must be at least 1, got {r}")
    if distill_alpha and teacher is None:
        raise ValueError("distill_alpha > 0 distils the teacher into the adapters: pass the uncollapsed teacher")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = kept_block_linears(student, target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        lora_dropout=lora_dropout,
        target_modules=targets,
    )
    peft_model = get_peft_model(unwrap_model(student), config)
    trainer_class, distillation = Trainer, {}
    if distill_alpha:
        from .distill import DistillationTrainer

        trainer_class = DistillationTrainer
        distillation = dict(teacher=teacher, alpha=distill_alpha, temperature=temperature)
    trainer = trainer_class(model=peft_model, args=args, train_dataset=train_dataset, **distillation, **trainer_kwargs)
    trainer.train()
    return unwrap_model(trainer.model, keep_peft=True).merge_and_unload()


class LoRA(HealingMethod):
    """``"lora"``: peft LoRA on the linears of the kept blocks, merged back (options ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``distill_alpha`` (0: the task loss; > 0: that share of the loss is the KL to
    the teacher's logits, at ``temperature``) and any ``Trainer`` argument)."""

    name = "lora"
    description = "peft LoRA on the kept blocks, merged back"
    #: LoRA heals with a larger step than full-parameter distillation: on SmolLM2 with 8 of 30 blocks removed, 7
    #: minutes of LoRA (r=16) at 5e-4 took perplexity from 101.8 to 42.5, distillation at 5e-5 to 51.5
    #: (an earlier run of the llm_depth benchmark, benchmarks/experiments/llm_depth.json).
    learning_rate = 5e-4

    def needs_teacher(self, options):
        return bool(options.get("distill_alpha"))

    def run(self, student, teacher, train_dataset, args, **options):
        return lora(student, train_dataset, args, teacher=teacher, **options)

"""Healing a collapsed model: :func:`heal` with any registered healing method (:data:`HEALING`).

Built in: ``"distill"`` (:mod:`~hf_collapse.healing.distill`), ``"lora"`` (:mod:`~hf_collapse.healing.lora`) and the
training-free ``"linear"`` replacement (:mod:`~hf_collapse.healing.linear`). A new method is one file with one
:class:`HealingMethod` subclass and one registration (``HEALING.register(MyHealing())``).

Every method returns a healed **copy** of the student with the student's architecture and ``hf_collapse``
record, so ``save_pretrained`` + plain ``from_pretrained`` / ``AutoCollapsedModel.from_pretrained`` reload it
exactly, as they would the student.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..architectures.base import unwrap_model
from ..surgery import collapse_record, is_peft_model
from .base import HEALING, HealingMethod
from .common import RemovedSpan, calibration_batches, check_teacher, removed_spans
from .distill import Distill, DistillationTrainer, distillation_loss, is_causal_lm, logit_mask
from .linear import LinearReplacement, fold_site
from .lora import LoRA, kept_block_linears

__all__ = [
    "HEALING",
    "HEAL_METHODS",
    "Distill",
    "DistillationTrainer",
    "HealingMethod",
    "LinearReplacement",
    "LoRA",
    "RemovedSpan",
    "calibration_batches",
    "check_heal_applicable",
    "distillation_loss",
    "fold_site",
    "heal",
    "is_causal_lm",
    "kept_block_linears",
    "logit_mask",
    "removed_spans",
]

for _builtin in (Distill(), LoRA(), LinearReplacement()):
    HEALING.register(_builtin)

#: The methods :func:`heal` accepts (the registry: ``in``, iteration and ``len`` work on its names).
HEAL_METHODS = HEALING


def check_heal_applicable(method: str, *, sublayers: bool) -> None:
    """Refuse, before any work, a healing method that cannot heal the removal asked for (``sublayers``: attention or
    MLP sub-layers are removed, not whole blocks).

    Raises:
        ValueError: for an unknown method, or one that heals whole-block removals only after a sub-layer removal.
    """
    entry = HEALING.get(method)
    if sublayers and entry.whole_blocks_only:
        usable = [m.name for m in HEALING.entries() if not m.whole_blocks_only]
        raise ValueError(
            f"healing {method!r} ({entry.description}) heals removals of whole blocks, and this removal takes "
            f"attention or MLP sub-layers: heal it with {' or '.join(usable)}, or remove whole blocks"
        )


def heal(
    student: nn.Module, teacher: nn.Module | None, train_dataset, method: str = "distill", args=None, **kwargs: Any
) -> nn.Module:
    """Recover what a collapse cost: a healed copy of ``student`` (``student`` and ``teacher`` are untouched).

    Args:
        student: the collapsed model (from :func:`hf_collapse.remove_blocks` / :func:`hf_collapse.collapse`).
        teacher: the uncollapsed model it came from (same family); needed by ``"distill"``, ``"linear"`` and
            ``"lora"`` with ``distill_alpha``, checked for its family by all (``None`` is accepted for ``"lora"``).
        train_dataset: the training data (``"linear"`` uses its first few batches for calibration).
        method: a registered healing method (:data:`HEALING`); built in: ``"distill"`` — knowledge distillation
            with :class:`DistillationTrainer` (kwargs ``temperature``, ``alpha``, ``hidden_weight``, and any
            ``Trainer`` argument such as ``data_collator``);
            ``"lora"`` — peft LoRA on the linears of the kept blocks, merged back (kwargs ``r``, ``lora_alpha``,
            ``lora_dropout``, ``target_modules``, ``distill_alpha`` (0: the task loss; > 0: that share of the loss is
            the KL to the teacher's logits, at ``temperature``) and ``Trainer`` arguments);
            ``"linear"`` — training-free linear replacement of each removed span folded into the preceding
            block's projection (kwargs ``data_collator``, ``calibration_batches`` (16), ``ridge`` (1e-3),
            ``objective`` (``"lstsq"`` or ReplaceMe's ``"cosine"``), ``cosine_steps`` (100), ``cosine_lr`` (1e-3);
            see :mod:`hf_collapse.healing.linear` for the formulation).
        args: ``transformers.TrainingArguments`` (required by a method that trains, ``"distill"`` and ``"lora"``;
            for ``"linear"`` only its batch size is read).

    Returns:
        The healed model, a plain model of the student's class in the student's train/eval mode, whose
        ``hf_collapse`` record is the student's.

    Raises:
        ValueError: for an unknown method, a teacher of another family, missing ``args`` for a training method,
            and, for ``"linear"``, a student with no removed blocks or a span that cannot be folded exactly.

    Example::

        >>> student = hf_collapse.remove_blocks(teacher, ["model.layers.2", "model.layers.3"])
        >>> healed = hf_collapse.heal(student, teacher, dataset, method="linear", data_collator=collator)
        >>> healed.save_pretrained("healed")          # reloads exactly, as the student would
    """
    entry = HEALING.get(method)
    if is_peft_model(student):
        raise ValueError("heal a plain model: merge the student's peft adapter first (`merge_and_unload()`)")
    if teacher is None:
        if entry.needs_teacher(kwargs):
            raise ValueError(f"method {method!r} needs the uncollapsed teacher model")
    else:
        check_teacher(student, teacher)
    if entry.trains and args is None:
        raise ValueError(f"method {method!r} trains: pass args=transformers.TrainingArguments(output_dir=..., ...)")
    record = collapse_record(student)
    student_mode = student.training
    healed = copy.deepcopy(unwrap_model(student))
    teacher_mode = teacher.training if teacher is not None else None
    try:
        healed = entry.run(healed, teacher, train_dataset, args, **kwargs)
    finally:  # the teacher leaves in the train / eval mode it came in
        if teacher is not None:
            teacher.train(teacher_mode)
    if collapse_record(healed) != record:
        raise RuntimeError("healing changed the model's hf_collapse record; this is a bug in hf_collapse.heal")
    return healed.train(student_mode)

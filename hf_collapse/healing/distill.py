"""Knowledge distillation from the uncollapsed teacher: :class:`DistillationTrainer` and the ``"distill"`` method."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..architectures.base import is_causal_lm, unwrap_model
from ..metrics import device_of, to_device
from .base import HealingMethod

__all__ = ["Distill", "DistillationTrainer", "distill", "distillation_loss", "is_causal_lm", "logit_mask"]


def logit_mask(inputs: dict[str, Any], logits: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """``(batch, positions)`` boolean mask of the logit positions distillation counts, ``None`` for all.

    Token-level logits (3-D) exclude padding (``attention_mask == 0``) and ``-100`` labels. For a causal LM the
    logits at position t are scored against the label at t + 1 (the shift of its own loss), so the last position
    is dropped, and a position counts when both t and t + 1 are real tokens with a label at t + 1; the logits must be
    sliced the same way (``logits[:, :-1]``).
    """
    if logits.dim() != 3:
        return None
    batch, positions = logits.shape[:2]
    mask = torch.ones(batch, positions, dtype=torch.bool, device=logits.device)
    attention = inputs.get("attention_mask")
    labels = inputs.get("labels")
    if attention is not None and tuple(attention.shape) == (batch, positions):
        mask &= attention.to(logits.device).bool()
    if causal:
        # The logits at t predict the token at t + 1: both must be real tokens (with left padding, the first real
        # token is predicted from a padding position, which says nothing about the model).
        mask = mask[:, 1:] & mask[:, :-1]
        if labels is not None and tuple(labels.shape) == (batch, positions):
            mask &= labels[:, 1:].to(logits.device) != -100
    elif labels is not None and tuple(labels.shape) == (batch, positions):
        mask &= labels.to(logits.device) != -100
    return mask


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times ``temperature**2`` (Hinton et al.).

    Averaged over the positions where ``mask`` is true (over the batch for sequence-level logits); ``0`` when
    the mask keeps nothing.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: distillation needs the same task head and vocabulary"
        )
    vocab = student_logits.shape[-1]
    log_student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if mask is not None:
        weights = mask.reshape(-1).to(per_position.dtype)
        return (per_position * weights).sum() / weights.sum().clamp_min(1.0) * temperature**2
    return per_position.mean() * temperature**2


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distils a teacher into the model it trains.

    The loss is ``alpha * KL + (1 - alpha) * task_loss`` where KL is :func:`distillation_loss` between the
    student's and the teacher's logits at ``temperature`` (token-level logits: padding and ``-100`` positions
    excluded, with the causal shift for causal LMs), and the task loss is the model's own (``labels`` in the
    batch; without labels the loss is the KL alone). With ``hidden_weight > 0`` the mean squared error between
    the student's and the teacher's last hidden states (real tokens only) is added, times ``hidden_weight``.

    The teacher runs in eval mode without gradients, on the student's device (it is moved there on first use).

    Example::

        trainer = DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments("out"),
                                      train_dataset=dataset, data_collator=collator, temperature=2.0, alpha=0.5)
        trainer.train()
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        hidden_weight: float = 0.0,
        causal: bool | None = None,
        **kwargs: Any,
    ):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch model, got {type(teacher).__name__}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weighs the KL against the task loss and must lie in [0, 1], got {alpha}")
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.hidden_weight = float(hidden_weight)
        self.causal = is_causal_lm(self.model) if causal is None else bool(causal)
        # The loss is ours, not the model's: let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        want_hidden = self.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=True) if want_hidden else model(**inputs)
        device = outputs["logits"].device
        if device_of(self.teacher) != device:
            self.teacher.to(device)
        self.teacher.eval()
        with torch.no_grad():
            teacher_inputs = to_device(dict(inputs), device)
            teacher_outputs = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)
        student_logits, teacher_logits = outputs["logits"], teacher_outputs["logits"]
        mask = logit_mask(inputs, student_logits, self.causal)
        if self.causal and student_logits.dim() == 3:
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        loss = distillation_loss(student_logits, teacher_logits, mask, self.temperature)
        task_loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if task_loss is not None:
            loss = self.alpha * loss + (1.0 - self.alpha) * task_loss
        if want_hidden:
            student_hidden, teacher_hidden = outputs["hidden_states"][-1], teacher_outputs["hidden_states"][-1]
            if student_hidden.shape != teacher_hidden.shape:
                raise ValueError(
                    f"hidden-state matching needs the same hidden size: student "
                    f"{tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}"
                )
            squared = (student_hidden - teacher_hidden).pow(2).mean(-1)
            attention = inputs.get("attention_mask")
            if attention is not None and tuple(attention.shape) == tuple(squared.shape):
                weights = attention.to(squared.dtype)
                hidden_loss = (squared * weights).sum() / weights.sum().clamp_min(1.0)
            else:
                hidden_loss = squared.mean()
            loss = loss + self.hidden_weight * hidden_loss
        return (loss, outputs) if return_outputs else loss


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset,
    args,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hidden_weight: float = 0.0,
    **trainer_kwargs: Any,
) -> nn.Module:
    """Train ``student`` (in place: :func:`hf_collapse.heal` passes a copy) by distillation; returns it."""
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=train_dataset,
        temperature=temperature,
        alpha=alpha,
        hidden_weight=hidden_weight,
        **trainer_kwargs,
    )
    trainer.train()
    return unwrap_model(trainer.model)


class Distill(HealingMethod):
    """``"distill"``: knowledge distillation from the uncollapsed teacher with :class:`DistillationTrainer` (options
    ``temperature``, ``alpha``, ``hidden_weight`` and any ``Trainer`` argument)."""

    name = "distill"
    description = "knowledge distillation from the uncollapsed model"

    def run(self, student, teacher, train_dataset, args, **options):
        return distill(student, teacher, train_dataset, args, **options)

"""Evaluating a model with a fresh ``transformers.Trainer``, and naming the metric a budget refers to."""

from __future__ import annotations

import copy

from torch import nn

from . import compat

__all__ = ["evaluate_model", "metric_key"]


def metric_key(args, has_compute_metrics: bool) -> tuple[str, bool]:
    """The evaluation metric a compression budget refers to, and whether higher is better:
    ``args.metric_for_best_model`` if set, else ``accuracy`` with ``compute_metrics``, else the loss.

    The name carries the ``eval_`` prefix of ``Trainer.evaluate``'s keys. Without ``metric_for_best_model``,
    ``compute_metrics`` is assumed to return an ``"accuracy"`` entry.

    Example::

        >>> from hf_collapse.evaluation import metric_key
        >>> metric_key(TrainingArguments("out"), has_compute_metrics=True)
        ('eval_accuracy', True)
        >>> metric_key(TrainingArguments("out", metric_for_best_model="f1"), has_compute_metrics=True)
        ('eval_f1', True)
    """
    name = args.metric_for_best_model or ("accuracy" if has_compute_metrics else "loss")
    name = name if name.startswith("eval_") else f"eval_{name}"
    higher = args.greater_is_better if args.metric_for_best_model else not name.endswith("loss")
    return name, bool(higher)


def evaluate_model(model: nn.Module, args, eval_dataset, **trainer_kwargs) -> dict[str, float]:
    """Evaluate ``model`` with a fresh ``transformers.Trainer`` built from ``args`` (reporting disabled) and
    ``trainer_kwargs`` (``data_collator``, ``compute_metrics``, ``processing_class``, ``compute_loss_func``).

    ``args`` itself is not modified (a copy is used, with reporting off). A subclass of ``TrainingArguments`` (e.g.
    ``LaCoOTArguments``) evaluates as its ``TrainingArguments`` part: the Trainer is a plain one.
    Returns ``Trainer.evaluate``'s metrics, keys prefixed with ``eval_``.

    Example::

        >>> from hf_collapse.evaluation import evaluate_model
        >>> metrics = evaluate_model(model, TrainingArguments("out"), test,
        ...                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
        >>> metrics["eval_loss"], metrics["eval_accuracy"]
    """
    from transformers import Trainer

    args = copy.deepcopy(args)
    args.report_to = []
    try:
        return Trainer(model=model, args=args, eval_dataset=eval_dataset, **trainer_kwargs).evaluate()
    finally:
        # accelerate marks a model it prepared, and never wraps a marked model (or a deep copy of it) again: a
        # later fine-tuning Trainer would then train without DDP and the ranks would drift apart.
        compat.forget_accelerate_preparation(model)

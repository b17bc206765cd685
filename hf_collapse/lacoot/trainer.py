"""LaCoOTTrainer: a ``transformers.Trainer`` that adds λ·MSW(block input, block output) to the task loss.

What the penalty sees under DDP: each rank's **local** batch. The MSW of a batch is a statistic of the
empirical distributions of that batch; DDP averages the gradients of the per-rank penalties exactly as it
averages the task loss's, so no gather (and no extra communication on the hot path) is needed, and the
result equals single-process training with per-device batches. The random directions that start the
ascent are seeded by ``(args.seed, block index)``, identical on every rank.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..block_io import BlockIO, select_blocks
from ..collapse import collapse as collapse_model
from ..collapse import evaluate_model, metric_key
from ..ot import max_sliced_wasserstein
from ..report import CollapseReport
from ..scoring import score_blocks
from .arguments import LaCoOTArguments

__all__ = ["LaCoOTTrainer"]

logger = logging.getLogger(__name__)


class LaCoOTTrainer(Trainer):
    """Trains with the LaCoOT penalty, scores blocks by their MSW, and collapses the model.

    Use it exactly like ``Trainer``, with :class:`LaCoOTArguments`::

        >>> args = LaCoOTArguments("out", msw_weight=1.0, num_train_epochs=3)
        >>> trainer = LaCoOTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
        ...                         processing_class=tokenizer, compute_metrics=accuracy)
        >>> trainer.train()
        >>> collapsed, report = trainer.collapse(max_metric_drop=0.02)

    The penalty is added in :meth:`compute_loss`, scaled like the task loss under gradient accumulation,
    computed in float32 under autocast, from hooks that record nothing during a gradient-checkpointing
    recompute. Padding tokens are zeroed in block inputs and outputs. Per-block distances and their total are
    logged as ``msw/<block>`` and ``msw_total``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LaCoOTArguments):
            raise TypeError(
                f"LaCoOTTrainer needs LaCoOTArguments (TrainingArguments plus the msw_* settings), "
                f"got {type(self.args).__name__}"
            )
        # Hooks go on the unwrapped model: DDP / accelerate wrappers share its modules.
        self.msw_blocks = select_blocks(self.model, self.args.msw_block_names)
        self._block_io = BlockIO(self.model, self.msw_blocks)
        self._directions: dict[str, torch.Tensor] = {}
        self._generators = {
            block.name: torch.Generator().manual_seed(self.args.seed + i) for i, block in enumerate(self.msw_blocks)
        }
        self._msw_sums: dict[str, float] = defaultdict(float)  # per block, since the last log
        self._msw_total = 0.0
        self._msw_steps = 0
        self.collapse_report: CollapseReport | None = None  # set by collapse(), used by the model card

    # -- training --------------------------------------------------------------------------------------
    def _penalty_active(self, model: nn.Module) -> bool:
        return self.args.msw_weight > 0 and model.training

    def _warm_start(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The previous step's direction for this block, fitted to this batch's feature shape.

        With dynamic padding the number of tokens changes between batches: the direction is cut or
        zero-padded along the token axis and renormalized. Any other change of shape starts cold.
        """
        previous = self._directions.get(name)
        if previous is None:
            return None
        if previous.shape != shape:
            if previous.dim() != 2 or len(shape) != 2 or previous.shape[1] != shape[1]:
                return None
            fitted = previous.new_zeros(shape)
            tokens = min(previous.shape[0], shape[0])
            fitted[:tokens] = previous[:tokens]
            if fitted.norm() < 1e-6:
                return None
            previous = fitted / fitted.norm()
        return previous.flatten()

    def msw_penalty(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The reduced MSW over the blocks recorded by the last forward pass, and each block's value."""
        values = []
        per_block = {}
        for block in self.msw_blocks:
            raw, raw_output = self._block_io.raw(block.name)
            x, y = raw.flatten(1), raw_output.flatten(1)
            distance, direction = max_sliced_wasserstein(
                x, y, slicing=self.args.msw_slicing, n_projections=self.args.msw_projections,
                ascent_steps=self.args.msw_ascent_steps, init_direction=self._warm_start(block.name, raw.shape[1:]),
                generator=self._generators[block.name], return_direction=True,
            )
            if self.args.msw_slicing == "ascent":
                self._directions[block.name] = direction.reshape(raw.shape[1:])
            values.append(distance)
            per_block[block.name] = float(distance.detach())
        stacked = torch.stack(values)
        return (stacked.mean() if self.args.msw_reduction == "mean" else stacked.sum()), per_block

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when this is False the Trainer divides the returned loss by the
        # accumulation steps; when True it does not, and the penalty must be divided here.
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss of ``Trainer.compute_loss`` plus ``msw_weight`` times the MSW penalty (training only)."""
        if not self._penalty_active(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with self._block_io.capturing(attention_mask=inputs.get("attention_mask")):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        penalty, per_block = self.msw_penalty()
        self._msw_total += float(penalty.detach())
        if self._task_loss_is_scaled_for_ga(num_items_in_batch):
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + self.args.msw_weight * penalty.to(loss.dtype)
        for name, value in per_block.items():
            self._msw_sums[name] += value
        self._msw_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean per-block MSW since the last log (``msw/<block>``) and their total (``msw_total``)."""
        if self._msw_steps and "loss" in logs:
            means = {name: total / self._msw_steps for name, total in self._msw_sums.items()}
            for name, value in means.items():
                logs[f"msw/{name}"] = round(value, 6)
            logs["msw_total"] = round(self._msw_total / self._msw_steps, 6)
            self._msw_sums.clear()
            self._msw_total = 0.0
            self._msw_steps = 0
        super().log(logs, *args, **kwargs)

    # -- scoring and collapse --------------------------------------------------------------------------
    def block_scores(self, eval_dataset=None, max_batches: int | None = None) -> dict[str, float]:
        """Per-block MSW on evaluation data, deterministic (seeded directions, no warm start)."""
        return score_blocks(
            self.model, self.get_eval_dataloader(eval_dataset), method="msw",
            blocks=[b.name for b in self.msw_blocks], max_batches=max_batches, seed=self.args.seed,
            slicing=self.args.msw_slicing, n_projections=self.args.msw_projections,
            ascent_steps=max(self.args.msw_ascent_steps, 10) if self.args.msw_slicing == "ascent" else 0,
            progress=not self.args.disable_tqdm,
        )

    def evaluate_model(self, model: nn.Module, eval_dataset=None) -> dict[str, float]:
        """Evaluate another model (e.g. a collapsed one) with this trainer's data, collator and metrics."""
        return evaluate_model(model, self.args, eval_dataset if eval_dataset is not None else self.eval_dataset,
                              data_collator=self.data_collator, processing_class=self.processing_class,
                              compute_metrics=self.compute_metrics, compute_loss_func=self.compute_loss_func)

    def collapse(
        self,
        num_blocks: int | None = None,
        max_metric_drop: float | None = None,
        eval_dataset=None,
        scores: dict[str, float] | None = None,
        **collapse_kwargs: Any,
    ) -> tuple[nn.Module, CollapseReport]:
        """Remove the blocks with the smallest MSW, under a block count and/or a metric budget.

        The metric is ``args.metric_for_best_model`` (default: ``accuracy`` when ``compute_metrics`` is set,
        else the loss), evaluated on ``eval_dataset`` (default: the trainer's). Returns a new model and its
        :class:`CollapseReport`; the trained model is untouched. Call it on every rank under DDP (it is
        deterministic) and save on the main process only (``trainer.is_world_process_zero()``).
        """
        scores = scores if scores is not None else self.block_scores(eval_dataset)
        metric_name, higher_is_better = metric_key(self.args, self.compute_metrics is not None)
        needs_eval = max_metric_drop is not None or self.eval_dataset is not None or eval_dataset is not None

        def eval_fn(model: nn.Module) -> float:
            metrics = self.evaluate_model(model, eval_dataset)
            if metric_name not in metrics:
                raise ValueError(f"evaluation returned no {metric_name!r}; got {sorted(metrics)}")
            return float(metrics[metric_name])

        collapse_kwargs.setdefault("progress", not self.args.disable_tqdm)
        collapsed, report = collapse_model(
            self.model, scores, num_blocks=num_blocks, max_metric_drop=max_metric_drop,
            eval_fn=eval_fn if needs_eval else None, higher_is_better=higher_is_better,
            metric_name=metric_name.removeprefix("eval_"), method="LaCoOT", **collapse_kwargs,
        )
        report.extra.update({
            "msw_weight": self.args.msw_weight, "msw_slicing": self.args.msw_slicing,
            "msw_reduction": self.args.msw_reduction, "epochs": self.args.num_train_epochs,
            "learning_rate": self.args.learning_rate,
        })
        self.collapse_report = report
        return collapsed, report

    def create_model_card(self, model_name: str | None = None, finetuned_from: str | None = None,
                          dataset: str | list[str] | None = None, **kwargs: Any) -> None:
        """Write hf_collapse's model card (method, λ, the last collapse report) to ``output_dir/README.md``, so
        that ``trainer.push_to_hub()`` publishes it instead of the generic Trainer card."""
        if not self.is_world_process_zero():
            return
        from ..hub import model_card

        datasets = [dataset] if isinstance(dataset, str) else dataset
        base = finetuned_from or getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        card = model_card(self.model, self.collapse_report, base_model=base if base and "/" in str(base) else None,
                          datasets=datasets, model_name=model_name,
                          training=f"Trained with LaCoOTTrainer: λ = {self.args.msw_weight}, slicing "
                                   f"{self.args.msw_slicing}, {self.args.num_train_epochs} epochs at learning rate "
                                   f"{self.args.learning_rate}.")
        card.save(str(Path(self.args.output_dir) / "README.md"))

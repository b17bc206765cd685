"""LaCoOTTrainer: a ``transformers.Trainer`` that adds λ·MSW(block input, block output) to the task loss.

What the penalty sees under DDP: each rank's **local** batch. The MSW of a batch is a statistic of the
empirical distributions of that batch (of ``per_device_train_batch_size`` samples, not of the global batch); DDP
averages the gradients of the per-rank penalties exactly as it averages the task loss's, so no gather (and no
extra communication on the hot path) is needed. The random directions that start the ascent are seeded by
``(args.seed, block index)``, identical on every rank.

The penalty itself (block selection, hooks, warm-start directions, generators, their checkpoint state) is
:class:`~hf_collapse.lacoot.penalty.MSWPenalty`, the same object a custom training loop uses: this module only adds
the Trainer's scaling, logging, checkpoint files, scoring and collapse.

Under FSDP (accelerate's ``fsdp_version: 2``) the hooks stay valid: they are registered on the unwrapped model's
modules, which ``fully_shard`` keeps as the same objects, and the penalty reads only block activations, never
parameters, so it works on sharded parameters as is.

λ means one thing: the penalty is scaled exactly as the Trainer scales the task loss, so its weight relative to
the task loss does not depend on gradient accumulation or on the number of processes, whether the model's loss
is a local mean (sequence classifiers) or normalised by the Trainer's ``num_items_in_batch`` (causal LMs).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .. import compat
from ..block_io import DATA_PARALLEL_MESSAGE, BlockIO
from ..deprecation import renamed
from ..distributed import is_sharded, sum_across_ranks, unsharded_copy
from ..evaluation import evaluate_model, metric_key
from ..removal import collapse as collapse_model
from ..report import CollapseReport, describe_split
from ..scoring import score_blocks
from .arguments import LaCoOTArguments
from .penalty import MSWPenalty

__all__ = ["LaCoOTTrainer"]

logger = logging.getLogger(__name__)

#: The file, in each Trainer checkpoint, that holds what shapes the rest of a LaCoOT run besides the weights and the
#: optimizer: the warm-start directions of the ascent and the state of the per-block generators (one per rank).
PENALTY_STATE_NAME = "lacoot_penalty_state_rank{rank}.pt"


class _PenaltyCheckpointCallback(TrainerCallback):
    """Writes the penalty's state into every Trainer checkpoint, next to the optimizer's."""

    def __init__(self, trainer: LaCoOTTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            self.trainer.save_penalty_state(folder)


class LaCoOTTrainer(Trainer):
    """Trains with the LaCoOT penalty, scores blocks by their MSW, and collapses the model.

    Use it exactly like ``Trainer``, with :class:`LaCoOTArguments`::

        >>> args = LaCoOTArguments("out", msw_weight=1.0, num_train_epochs=3)
        >>> trainer = LaCoOTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
        ...                         processing_class=tokenizer, compute_metrics=accuracy)
        >>> trainer.train()
        >>> collapsed, report = trainer.collapse(max_metric_delta=0.02)

    The penalty is added in :meth:`compute_loss`, scaled like the task loss under gradient accumulation,
    computed in float32 under autocast, from hooks that record nothing during a gradient-checkpointing
    recompute. Padding tokens, and tokens whose prediction is not trained (``-100`` labels, e.g. the prompt of SFT
    data on a causal LM), are zeroed in block inputs and outputs. Per-block distances and their total are
    logged as ``msw/<block>`` and ``msw_total``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LaCoOTArguments):
            raise TypeError(
                f"LaCoOTTrainer needs LaCoOTArguments (TrainingArguments plus the msw_* settings), "
                f"got {type(self.args).__name__}"
            )
        if self.args.n_gpu > 1:  # the Trainer would wrap the model in nn.DataParallel
            raise ValueError(f"LaCoOTTrainer on {self.args.n_gpu} GPUs in one process: {DATA_PARALLEL_MESSAGE}")
        # Hooks go on the unwrapped model: DDP / accelerate wrappers and FSDP2 share its modules.
        self.penalty = MSWPenalty(
            self.model,
            self.args.msw_block_names,
            slicing=self.args.msw_slicing,
            n_projections=self.args.msw_projections,
            ascent_steps=self.args.msw_ascent_steps,
            reduction=self.args.msw_reduction,
            seed=self.args.seed,
        )
        self._msw_sums: dict[str, float] = defaultdict(float)  # per block, since the last log
        self._msw_total = 0.0
        self._msw_weight_applied = 0.0  # the sum of the λ applied since the last log (logged as their mean)
        self._msw_steps = 0
        self._loss_uses_num_items: bool | None = None  # probed once (see _penalty_scale)
        self.collapse_report: CollapseReport | None = None  # set by collapse(), used by the model card
        self.collapsed_model: nn.Module | None = None  # set by collapse(): what save_model / push_to_hub publish
        self.add_callback(_PenaltyCheckpointCallback(self))

    @property
    def msw_blocks(self):
        """The penalized blocks (``self.penalty.blocks``)."""
        return self.penalty.blocks

    @property
    def _block_io(self) -> BlockIO:
        return self.penalty.block_io

    @property
    def _directions(self) -> dict[str, torch.Tensor]:
        return self.penalty.directions

    # -- training --------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; resuming from a checkpoint also restores the penalty's warm-start directions and
        generators, so that a resumed run ends where the uninterrupted one does. Training again forgets the last
        collapse (``save_model`` publishes the trained model until ``collapse`` is called again)."""
        self.collapsed_model, self.collapse_report = None, None
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            folder = (
                get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            )
            if folder is not None:
                self._load_penalty_state(Path(folder))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _penalty_state_file(self, folder: Path) -> Path:
        return folder / PENALTY_STATE_NAME.format(rank=self.args.process_index)

    def save_penalty_state(self, folder: Path) -> None:
        """Write the penalty's state (warm-start directions, generators) into the checkpoint ``folder``."""
        # Each rank warm-starts from directions fitted to its own batches: one file per rank.
        torch.save(self.penalty.state_dict(), self._penalty_state_file(folder))

    def _load_penalty_state(self, folder: Path) -> None:
        file = self._penalty_state_file(folder)
        if not file.is_file():
            logger.warning(
                "%s has no %s: the MSW ascent restarts cold from this checkpoint (the run will not end "
                "exactly where an uninterrupted one would)",
                folder,
                file.name,
            )
            return
        state = torch.load(file, map_location="cpu", weights_only=True)
        try:
            self.penalty.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None

    def _penalty_active(self, model: nn.Module) -> bool:
        return self.args.msw_weight > 0 and model.training

    def msw_penalty(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The reduced MSW over the blocks recorded by the last forward pass, and each block's value
        (:class:`MSWPenalty`'s call and :meth:`MSWPenalty.last_values`)."""
        penalty = self.penalty()
        return penalty, self.penalty.last_values()

    @property
    def task_loss_normalization(self) -> str | None:
        """How the model's own loss was found to be normalised, which decides the penalty's scaling (see
        :meth:`_penalty_scale`): ``"num_items_in_batch"`` (a causal LM's: the token sum over the Trainer's global
        count), ``"local_mean"`` (a sequence classifier's), or ``None`` while undecided."""
        if self._loss_uses_num_items is None:
            return None
        return "num_items_in_batch" if self._loss_uses_num_items else "local_mean"

    def _probe_losses(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[float, float]:
        """The model's loss on ``inputs`` with ``num_items_in_batch`` 1 and 2: two forward passes in eval mode without
        gradients, which touch neither the weights, the random state nor BatchNorm statistics. Runs the unwrapped
        model (no DDP collective: ranks may probe a different number of times)."""
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                losses = []
                for count in (1.0, 2.0):
                    outputs = unwrapped(**inputs, num_items_in_batch=torch.tensor(count, device=self.args.device))
                    losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs[0]))
        finally:
            unwrapped.train(was_training)
        return losses[0], losses[1]

    def _probe_vote(self, model: nn.Module, inputs: dict[str, Any]) -> bool | None:
        """This micro-batch's answer to "is the model's loss normalised by ``num_items_in_batch``?", or ``None`` when
        it cannot tell: a zero loss (a batch with nothing to train, e.g. SFT data whose response was truncated away,
        all labels ``-100``) or a non-finite one reads the same either way. Such a batch is probed again with its
        token-level labels replaced by its input ids, which any language model can score."""
        attempts = [inputs]
        labels, ids = inputs.get("labels"), inputs.get("input_ids")
        if isinstance(labels, torch.Tensor) and isinstance(ids, torch.Tensor) and labels.shape == ids.shape:
            attempts.append({**inputs, "labels": ids.clone()})
        for attempt in attempts:
            first, second = self._probe_losses(model, attempt)
            if math.isfinite(first) and math.isfinite(second) and abs(first) > 1e-12:
                return abs(first - second) > 1e-6 * abs(first)
        return None

    def _model_loss_uses_num_items(self, model: nn.Module, inputs: dict[str, Any]) -> bool:
        """Whether the model's own loss is normalised by ``num_items_in_batch`` (a causal LM's is) or ignores it
        (a sequence classifier's local mean).

        Decided once, by probing micro-batches until one can tell (:meth:`_probe_vote`), and agreed over every rank:
        each rank votes on its own micro-batch and the conclusive votes are summed, so that no rank's batch decides
        alone and all ranks decide at the same step. Until a decision (every rank's batch inconclusive so far), a
        micro-batch is scaled by the Trainer's own assumption, that a model accepting loss kwargs normalises by the
        count."""
        if self._loss_uses_num_items is None:
            vote = self._probe_vote(model, inputs)
            votes = sum_across_ranks(torch.tensor([vote is True, vote is False], dtype=torch.float64))
            normalized, local = float(votes[0]), float(votes[1])
            if normalized or local:
                if normalized and local:
                    logger.warning(
                        "LaCoOT: the ranks' probes disagree on whether the model's loss is normalised by "
                        "num_items_in_batch (%d yes, %d no); going with the majority",
                        normalized,
                        local,
                    )
                self._loss_uses_num_items = normalized >= local
            else:
                return bool(self.model_accepts_loss_kwargs)
        return self._loss_uses_num_items

    def _penalty_scale(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch) -> float:
        """The factor on ``msw_weight * penalty`` that gives the penalty the task loss's own scaling.

        The Trainer multiplies the task loss by ``s`` (the number of processes when it passes ``num_items_in_batch``
        and averages tokens across devices) and divides it by the accumulation steps unless it considers the loss
        already scaled for them. A loss normalised by the global ``num_items_in_batch`` then yields the mean gradient
        over micro-batches and ranks: the penalty needs ``1 / accumulation steps`` (DDP averages over ranks). A local
        mean yields ``s x accumulation steps`` times that mean: the penalty needs the same ``s`` and no division.
        Either way ``(task + λ penalty)`` is scaled as one, whatever the accumulation and the world size.
        """
        if num_items_in_batch is not None:
            if self.compute_loss_func is not None or (self.label_smoother is not None and "labels" in inputs):
                # The Trainer's label smoother divides by the count; a compute_loss_func is assumed to do the same, as
                # the Trainer itself assumes (it then neither divides by the accumulation steps nor checks).
                return 1.0 / self.current_gradient_accumulation_steps
            if self.model_accepts_loss_kwargs and self._model_loss_uses_num_items(model, inputs):
                return 1.0 / self.current_gradient_accumulation_steps
        return float(compat.trainer_task_loss_multiplier(self, num_items_in_batch))

    @property
    def current_msw_weight(self) -> float:
        """λ at the current step: ``msw_weight``, ramped linearly from 0 over the first ``msw_warmup_ratio`` of the
        training steps (it follows ``state.global_step``, so a resumed run continues the ramp where it was)."""
        ratio = self.args.msw_warmup_ratio
        if not ratio or not self.state.max_steps:
            return self.args.msw_weight
        ramp = ratio * self.state.max_steps
        return self.args.msw_weight * min(1.0, self.state.global_step / ramp)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss of ``Trainer.compute_loss`` plus ``msw_weight`` times the MSW penalty (training only),
        the penalty scaled like the task loss (see :meth:`_penalty_scale`)."""
        if isinstance(model, nn.DataParallel):
            raise ValueError(DATA_PARALLEL_MESSAGE)
        if not self._penalty_active(model):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        scale = self._penalty_scale(model, inputs, num_items_in_batch)
        with self.penalty.capture(inputs=inputs):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        penalty, per_block = self.msw_penalty()
        self._msw_total += float(penalty.detach())
        weight = self.current_msw_weight
        self._msw_weight_applied += weight
        loss = loss + (weight * scale) * penalty.to(loss.dtype)
        for name, value in per_block.items():
            self._msw_sums[name] += value
        self._msw_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean per-block MSW since the last log (``msw/<block>``), their total (``msw_total``) and, when λ is
        ramped, the mean λ applied over the same steps (``msw_weight``), as the loss is their mean."""
        if self._msw_steps and "loss" in logs:
            means = {name: total / self._msw_steps for name, total in self._msw_sums.items()}
            for name, value in means.items():
                logs[f"msw/{name}"] = round(value, 6)
            logs["msw_total"] = round(self._msw_total / self._msw_steps, 6)
            if self.args.msw_warmup_ratio:
                logs["msw_weight"] = self._msw_weight_applied / self._msw_steps
            self._msw_sums.clear()
            self._msw_total = 0.0
            self._msw_weight_applied = 0.0
            self._msw_steps = 0
        super().log(logs, *args, **kwargs)

    # -- scoring and collapse --------------------------------------------------------------------------
    def block_scores(self, dataset=None, max_batches: int | None = None, *, eval_dataset=None) -> dict[str, float]:
        """Per-block MSW on calibration data, deterministic (seeded directions, no warm start, the examples in order).

        The calibration data is the training data by default (``train_dataset``, its first ``max_batches`` batches
        of ``per_device_eval_batch_size``): the data that decides the budget (``eval_dataset``) and the data a model
        is reported on must not also choose the blocks. ``eval_dataset`` is the name of ``dataset`` in earlier
        versions (deprecated: a ``FutureWarning``)."""
        if eval_dataset is not None:
            renamed("eval_dataset", "dataset", "LaCoOTTrainer.block_scores")
            dataset = eval_dataset if dataset is None else dataset
        dataset = dataset if dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError("block_scores needs calibration data: a train_dataset, or pass dataset=")
        return score_blocks(
            self.model,
            self.get_eval_dataloader(dataset),
            method="msw",
            blocks=[b.name for b in self.msw_blocks],
            max_batches=max_batches,
            seed=self.args.seed,
            slicing=self.args.msw_slicing,
            n_projections=self.args.msw_projections,
            ascent_steps=max(self.args.msw_ascent_steps, 10) if self.args.msw_slicing == "ascent" else 0,
            progress=not self.args.disable_tqdm,
        )

    def evaluate_model(self, model: nn.Module, eval_dataset=None) -> dict[str, float]:
        """Evaluate another model (e.g. a collapsed one) with this trainer's data, collator and metrics.

        Under FSDP the evaluating Trainer shards what it evaluates, in place: it then evaluates a copy, so that
        ``model`` stays a plain model that surgery can go on editing."""
        if self.is_fsdp_enabled or is_sharded(model):
            model = copy.deepcopy(model)
        return evaluate_model(
            model,
            self.args,
            eval_dataset if eval_dataset is not None else self.eval_dataset,
            data_collator=self.data_collator,
            processing_class=self.processing_class,
            compute_metrics=self.compute_metrics,
            compute_loss_func=self.compute_loss_func,
        )

    def collapse(
        self,
        num_units: int | None = None,
        max_metric_delta: float | None = None,
        eval_dataset=None,
        scores: dict[str, float] | None = None,
        eval_fn: Callable[[nn.Module], float] | None = None,
        **collapse_kwargs: Any,
    ) -> tuple[nn.Module, CollapseReport]:
        """Remove the blocks with the smallest MSW, under a block count and/or a metric budget.

        The blocks are scored on the training data (:meth:`block_scores`) unless ``scores`` are given; the metric is
        ``args.metric_for_best_model`` (default: ``accuracy`` when ``compute_metrics`` is set, else the loss),
        evaluated on ``eval_dataset`` (default: the trainer's), the validation data that decides the budget: report on
        test data apart. The report names which data played which role (``report.data_roles``). ``eval_fn``
        (``model -> float``)
        replaces that evaluation, e.g. held-out perplexity for a causal LM
        (``eval_fn=lambda m: perplexity(m, loader), higher_is_better=False, metric_name="perplexity",
        max_metric_ratio=1.2``). Other keywords go to :func:`hf_collapse.collapse` (``max_metric_ratio``,
        ``flops_fraction``, ``latency_repeats``, ``progress_dir`` / ``resume_from`` to continue an interrupted
        collapse, and the deprecated ``num_blocks`` / ``max_metric_drop``). Returns a new model and its
        :class:`CollapseReport`; the trained model is untouched. Call it on every rank under DDP (it is deterministic)
        and save on the main process only (``trainer.is_world_process_zero()``). Under FSDP the sharded model is first
        gathered into a plain copy on every rank (:func:`hf_collapse.distributed.unsharded_copy`): surgery needs whole
        tensors.
        """
        scored_here = scores is None
        scores = scores if scores is not None else self.block_scores()
        metric_name, higher_is_better = metric_key(self.args, self.compute_metrics is not None)
        metric_name = collapse_kwargs.pop("metric_name", None) or metric_name.removeprefix("eval_")
        higher_is_better = collapse_kwargs.pop("higher_is_better", higher_is_better)
        metric_budget = any(
            collapse_kwargs.get(name) is not None
            for name in ("max_metric_ratio", "max_metric_drop", "max_metric_increase")
        )
        needs_eval = (
            eval_fn is not None
            or max_metric_delta is not None
            or metric_budget
            or self.eval_dataset is not None
            or eval_dataset is not None
        )

        def trainer_eval_fn(model: nn.Module) -> float:
            metrics = self.evaluate_model(model, eval_dataset)
            if f"eval_{metric_name}" not in metrics:
                raise ValueError(f"evaluation returned no {'eval_' + metric_name!r}; got {sorted(metrics)}")
            return float(metrics[f"eval_{metric_name}"])

        collapse_kwargs.setdefault("progress", not self.args.disable_tqdm)
        model = self.model
        if is_sharded(model):  # every rank gets the whole model and collapses it identically, as under DDP
            model = unsharded_copy(self.model_wrapped, all_ranks=True)  # FSDP1 gathers through its root wrapper
        collapsed, report = collapse_model(
            model,
            scores,
            num_units=num_units,
            max_metric_delta=max_metric_delta,
            eval_fn=(eval_fn or trainer_eval_fn) if needs_eval else None,
            higher_is_better=higher_is_better,
            metric_name=metric_name,
            method="LaCoOT",
            **collapse_kwargs,
        )
        report.data_roles = self._data_roles(eval_dataset, eval_fn, scored=scored_here)
        report.extra.update(
            {
                "msw_weight": self.args.msw_weight,
                "msw_warmup_ratio": self.args.msw_warmup_ratio,
                "msw_slicing": self.args.msw_slicing,
                "msw_reduction": self.args.msw_reduction,
                "epochs": self.args.num_train_epochs,
                "learning_rate": self.args.learning_rate,
            }
        )
        self.collapse_report, self.collapsed_model = report, collapsed
        return collapsed, report

    def _data_roles(self, eval_dataset, eval_fn, scored: bool) -> dict[str, str]:
        """Which data trained, calibrated and decided, as far as this trainer knows (:data:`~hf_collapse.report.
        DATA_ROLES`)."""
        training = describe_split(self.train_dataset) or "the LaCoOTTrainer's train_dataset"
        roles = {"training": training}
        if scored:
            roles["calibration"] = f"{training} (the blocks' MSW)"
        if eval_fn is None:
            deciding = eval_dataset if eval_dataset is not None else self.eval_dataset
            if deciding is not None:
                roles["validation"] = describe_split(deciding) or "the LaCoOTTrainer's eval_dataset"
        return roles

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, except after :meth:`collapse`: then the collapsed model (the one the report
        describes) is saved, with the processor, the report (``collapse_report.json``), the trade-off plot and the
        model card, so that the folder ``trainer.push_to_hub()`` uploads holds what its card describes."""
        if self.collapsed_model is None:
            return super().save_model(output_dir, _internal_call)
        from ..hub import save_with_card

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_with_card(
                self.collapsed_model,
                output_dir,
                self.collapse_report,
                processor=self.processing_class,
                **self._card_kwargs(),
            )
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _card_kwargs(
        self, model_name: str | None = None, finetuned_from: str | None = None, dataset: str | list[str] | None = None
    ) -> dict[str, Any]:
        datasets = [dataset] if isinstance(dataset, str) else dataset
        base = finetuned_from or getattr(getattr(self.model, "config", None), "name_or_path", None) or None
        return dict(
            base_model=base if base and "/" in str(base) else None,
            datasets=datasets,
            model_name=model_name,
            repo_id=self.hub_model_id,
            training=f"Trained with LaCoOTTrainer: λ = {self.args.msw_weight}, slicing "
            f"{self.args.msw_slicing}, {self.args.num_train_epochs} epochs at learning rate "
            f"{self.args.learning_rate}.",
        )

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write hf_collapse's model card (method, λ, the last collapse report) to ``output_dir/README.md``, so
        that ``trainer.push_to_hub()`` publishes it instead of the generic Trainer card. After :meth:`collapse` it
        describes the collapsed model, and the trade-off plot it shows is written next to it."""
        if not self.is_world_process_zero():
            return
        from ..hub import model_card

        folder = Path(self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if self.collapse_report is not None:
            self.collapse_report.plot(folder / "tradeoff.png")
        card = model_card(
            self.collapsed_model if self.collapsed_model is not None else self.model,
            self.collapse_report,
            **self._card_kwargs(model_name, finetuned_from, dataset),
        )
        card.save(str(folder / "README.md"))

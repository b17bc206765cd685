"""TLC's search: rank candidate sites by their calibration-loss gap, linearize the best, fine-tune, repeat.

:func:`compress` is a strategy of the collapse engine (:mod:`hf_collapse.engine`): the loop, the budget, the
measurements, the report and the progress folder (``compress(..., resume_from=<progress_dir>)``) are the engine's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures.base import unwrap_model
from ..budget import BUDGET_FIELDS
from ..distributed import is_main_process, sum_across_ranks
from ..engine import Budget, Candidate, SearchStrategy, run_search
from ..engine.progress import batches_digest, training_fingerprint
from ..evaluation import evaluate_model, metric_key
from ..metrics import device_of, to_device
from ..report import CollapseReport
from ..surgery import activation_sites, record_name
from .config import TLCConfig
from .statistics import SiteStatistics, activation_statistics
from .transforms import linearize, masked_identity

__all__ = ["compress"]

logger = logging.getLogger(__name__)

#: Where compress writes its progress by default, inside ``training_args.output_dir``.
PROGRESS_SUBDIR = "tlc_progress"


def calibration_loss(trainer, model: nn.Module, batches: list[dict[str, Any]]) -> float:
    was_training = model.training
    model.eval()
    device = device_of(model)
    try:
        with torch.no_grad():
            # compute_loss runs the model as given: the batches (kept on the CPU) go to the model's device here.
            total = sum(float(trainer.compute_loss(model, to_device(batch, device))) for batch in batches)
        # Under DDP each rank has its own calibration batches: average over all of them.
        pooled = sum_across_ranks(torch.tensor([total, len(batches)], dtype=torch.float64))
        return float(pooled[0] / pooled[1])
    finally:
        model.train(was_training)


def _candidate_losses(trainer, model: nn.Module, stats: dict[str, SiteStatistics], batches) -> dict[str, float]:
    """Calibration loss of the model with each site replaced by its candidate transform (one at a time)."""
    losses = {}
    for name, site_stats in stats.items():
        module = model.get_submodule(site_stats.site.activation)
        handle = module.register_forward_hook(masked_identity(site_stats.site, site_stats.on))
        try:
            losses[name] = calibration_loss(trainer, model, batches)
        finally:
            handle.remove()
    return losses


class TLCStrategy(SearchStrategy):
    """At each step, measure the statistics of the remaining sites on the current model, rank each site's candidate
    transform by its calibration-loss gap, and propose the best (or the best ``candidates_per_step`` while their gap
    stays <= 0, as the reference implementation does)."""

    unit_name = "activation layers"
    edits_change_weights = True  # fused maps hold new weights, and fine-tuning moves them

    def __init__(self, config: TLCConfig, remaining: list[str], trainer, batches: list[dict[str, Any]]):
        self.config, self.remaining, self.trainer, self.batches = config, list(remaining), trainer, batches
        self.proposed: Candidate | None = None  # the step being tried (its fine-tuning losses go to its details)

    def available(self) -> int:
        return len(self.remaining)

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        if not self.remaining:
            return None
        sites = [s for s in activation_sites(model) if s.name in self.remaining]
        stats = activation_statistics(model, self.batches, sites)
        reference = calibration_loss(self.trainer, model, self.batches)
        gaps = {
            name: loss - reference for name, loss in _candidate_losses(self.trainer, model, stats, self.batches).items()
        }
        order = sorted(gaps, key=gaps.get)
        chosen = [order[0]]
        for name in order[1 : min(self.config.candidates_per_step, room)]:
            if gaps[name] > 0:
                break
            chosen.append(name)
        details = [
            {
                "site": name,
                "neurons_on": stats[name].neurons_on,
                "neurons_off": stats[name].neurons_off,
                "entropy": round(stats[name].entropy, 4),
                "statistics": stats[name].source,
            }
            for name in chosen
        ]

        def apply(current: nn.Module) -> nn.Module:
            trial = current
            for name in chosen:
                trial = linearize(trial, stats[name], fuse=self.config.fuse, inplace=trial is not current)
            return trial

        self.proposed = Candidate(
            units=chosen,
            score=float(sum(gaps[name] for name in chosen)),
            apply=apply,
            details={
                "sites": details,
                "neurons_on": sum(d["neurons_on"] for d in details),
                "neurons_off": sum(d["neurons_off"] for d in details),
                "finetune_losses": [],
            },
        )
        return self.proposed

    def accept(self, candidate: Candidate) -> None:
        self.remaining = [name for name in self.remaining if name not in candidate.units]

    def state(self) -> dict[str, Any]:
        return {"remaining": list(self.remaining)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.remaining = list(state["remaining"])

    def fingerprint(self) -> dict[str, Any]:
        settings = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _BUDGET_FIELDS}
        if self.config.sites != "auto":
            settings["sites"] = list(self.remaining)
        return settings


#: The TLCConfig fields that make its budget (the engine's Budget), not the search's settings.
_BUDGET_FIELDS = (*BUDGET_FIELDS, "target_layers", "max_metric_drop")


def compress(
    model: nn.Module,
    config: TLCConfig,
    train_dataset,
    eval_dataset=None,
    training_args=None,
    data_collator=None,
    compute_metrics: Callable | None = None,
    *,
    progress_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    **trainer_kwargs: Any,
) -> tuple[nn.Module, CollapseReport]:
    """Collapse activation layers with TLC and return ``(compressed_model, report)``; ``model`` is untouched.

    At each step every remaining site's candidate transform (OFF neurons removed, activation made the identity)
    is scored by its calibration-loss gap against the current model; the best is applied and fused (see
    :func:`hf_collapse.tlc.transforms.linearize`), the model is fine-tuned with a ``transformers.Trainer`` for
    ``config.finetune_steps``, evaluated, and measured. The loop stops at ``config.num_units``, before a step
    that would exceed ``config.max_metric_delta`` (that step is undone), or when nothing is left to collapse.

    After every step the main process writes the run's progress to ``progress_dir`` (the edits so far, the
    fine-tuned weights, the report so far, the random generators; format in :mod:`hf_collapse.engine.progress`).
    An interrupted run continues with the same arguments plus ``resume_from=<progress_dir>``: the edits are
    replayed on ``model``, the weights of the last finished step restored, and the run ends where an
    uninterrupted one ends. A step interrupted mid-way is redone from its start. Once the run has finished the
    folder holds ``report.json`` (the returned report) and ``progress.json``; the weight files are removed.

    Args:
        model: a model of a supported family.
        config: a :class:`TLCConfig`.
        train_dataset: calibration and fine-tuning data.
        eval_dataset: evaluation data for the metric (default: none; the report then carries the loss of the
            calibration batches).
        training_args: ``TrainingArguments`` for fine-tuning and evaluation. The model is moved to its device
            (``args.device``); the fine-tuning between steps writes its checkpoints, if any, inside
            ``progress_dir`` and they are removed after each step.
        data_collator, compute_metrics, trainer_kwargs: passed to the ``Trainer``.
        progress_dir: where to write the progress (default: ``resume_from`` when resuming, else
            ``<training_args.output_dir>/tlc_progress``). A folder that holds an unfinished run is not
            overwritten: resume it or delete it.
        resume_from: the ``progress_dir`` of an interrupted run of the same model, data, ``config`` and
            ``training_args``.

    Raises:
        ValueError: for bad sites or budgets, and for a ``resume_from`` folder written for another model,
            config, data or arguments, or by a run that has already finished.

    Example::

        >>> compressed, report = hf_collapse.tlc.compress(model, TLCConfig(num_units=3), train, test, args,
        ...                                               compute_metrics=accuracy)
        >>> # interrupted? the same call with resume_from=f"{args.output_dir}/tlc_progress" continues it
        >>> report.save("outputs/tlc")
    """
    from transformers import Trainer, TrainingArguments

    if training_args is None:
        training_args = TrainingArguments("outputs/tlc", report_to=[], use_cpu=not torch.cuda.is_available())
    if (config.max_metric_delta is not None or config.max_metric_ratio is not None) and eval_dataset is None:
        # without evaluation data the loop measures the calibration loss: a metric budget would silently bound that
        raise ValueError("a metric budget (max_metric_delta / max_metric_ratio) needs an eval_dataset to evaluate on")
    # Refuses gated / unknown sites first; names from here on are relative to the unwrapped copy `current`.
    remaining = [record_name(model, s.name) for s in activation_sites(model, config.sites)]
    folder = Path(progress_dir or resume_from or Path(training_args.output_dir) / PROGRESS_SUBDIR)
    current = copy.deepcopy(unwrap_model(model))
    kwargs = dict(data_collator=data_collator, compute_metrics=compute_metrics, **trainer_kwargs)
    trainer = Trainer(model=current, args=training_args, train_dataset=train_dataset, **kwargs)  # moves `current`
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if len(batches) >= config.calibration_batches:
            break
    metric_name, higher = metric_key(training_args, compute_metrics is not None)
    if eval_dataset is None:
        metric_name, higher = "eval_loss", False

    def evaluate(m: nn.Module) -> float:
        if eval_dataset is None:
            return calibration_loss(trainer, m, batches)
        metrics = evaluate_model(m, training_args, eval_dataset, **kwargs)
        if metric_name not in metrics:
            raise ValueError(f"evaluation returned no {metric_name!r}; got {sorted(metrics)}")
        return float(metrics[metric_name])

    def finetune(trial: nn.Module) -> nn.Module:
        args = copy.deepcopy(training_args)
        if config.finetune_steps is not None:
            args.max_steps = config.finetune_steps
        # Checkpoints of this fine-tuning (if the arguments save any) belong to this step only: keep them out of the
        # user's output_dir, where each step would overwrite the last one's.
        args.output_dir = str(folder / "finetune")
        try:
            tuner = Trainer(model=trial, args=args, train_dataset=train_dataset, **kwargs)
            tuner.train()
        finally:
            if is_main_process():
                shutil.rmtree(args.output_dir, ignore_errors=True)
        strategy.proposed.details["finetune_losses"] = [h["loss"] for h in tuner.state.log_history if "loss" in h]
        return trial

    budget = config.budget(higher_is_better=higher) if config.has_budget() else None
    strategy = TLCStrategy(config, remaining, trainer, batches)
    compressed, report = run_search(
        current,
        strategy,
        budget or Budget(num_units=len(remaining), higher_is_better=higher),
        method="TLC",
        evaluate=evaluate,
        finetune=finetune if config.finetune_steps != 0 else None,
        metric_name=metric_name.removeprefix("eval_"),
        reference=copy.deepcopy(current).eval(),
        progress_dir=folder,
        resume_from=resume_from,
        description="TLC collapsing",
        show_progress=not training_args.disable_tqdm,
        fingerprint={"training": training_fingerprint(training_args), "data": batches_digest(batches)},
        extra={"fuse": config.fuse, "calibration_batches": len(batches), "finetune_steps": config.finetune_steps},
    )
    if budget is None:  # the report says what was asked: no limit but the sites
        report.budget = {}
    return compressed, report

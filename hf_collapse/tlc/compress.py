"""The TLC loop: rank candidate sites by their calibration-loss gap, collapse the best, fine-tune, repeat."""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures.base import adapter_for, unwrap_model
from ..collapse import evaluate_model, measure_step, metric_key
from ..distributed import is_main_process, sum_across_ranks
from ..metrics import device_of, hardware_description, to_device
from ..report import CollapseReport, CollapseStep
from ..surgery import model_class_name
from .config import TLCConfig
from .statistics import SiteStatistics, activation_sites, activation_statistics, record_name
from .transforms import linearize, masked_identity

__all__ = ["compress"]

logger = logging.getLogger(__name__)


def _calibration_loss(trainer, model: nn.Module, batches: list[dict[str, Any]]) -> float:
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
            losses[name] = _calibration_loss(trainer, model, batches)
        finally:
            handle.remove()
    return losses


def compress(
    model: nn.Module,
    config: TLCConfig,
    train_dataset,
    eval_dataset=None,
    training_args=None,
    data_collator=None,
    compute_metrics: Callable | None = None,
    **trainer_kwargs: Any,
) -> tuple[nn.Module, CollapseReport]:
    """Collapse activation layers with TLC and return ``(compressed_model, report)``; ``model`` is untouched.

    At each step every remaining site's candidate transform (OFF neurons removed, activation made the identity)
    is scored by its calibration-loss gap against the current model; the best is applied and fused (see
    :func:`hf_collapse.tlc.transforms.linearize`), the model is fine-tuned with a ``transformers.Trainer`` for
    ``config.finetune_steps``, evaluated, and measured. The loop stops at ``config.target_layers``, before a step
    that would exceed ``config.max_metric_drop`` (that step is undone), or when nothing is left to collapse.

    Args:
        model: a model of a supported family.
        config: a :class:`TLCConfig`.
        train_dataset: calibration and fine-tuning data.
        eval_dataset: evaluation data for the metric (default: none; the report then carries the loss of the
            calibration batches).
        training_args: ``TrainingArguments`` for fine-tuning and evaluation.
        data_collator, compute_metrics, trainer_kwargs: passed to the ``Trainer``.

    Example::

        >>> compressed, report = hf_collapse.tlc.compress(model, TLCConfig(target_layers=3), train, test, args,
        ...                                               compute_metrics=accuracy)
        >>> report.save("outputs/tlc")
    """
    from transformers import Trainer, TrainingArguments

    if training_args is None:
        training_args = TrainingArguments("outputs/tlc", report_to=[], use_cpu=not torch.cuda.is_available())
    if config.max_metric_drop is not None and eval_dataset is None:
        raise ValueError("max_metric_drop needs an eval_dataset to evaluate the metric on")
    # Refuses gated / unknown sites first; names from here on are relative to the unwrapped copy `current`.
    remaining = [record_name(model, s.name) for s in activation_sites(model, config.sites)]
    current = copy.deepcopy(unwrap_model(model))
    kwargs = dict(data_collator=data_collator, compute_metrics=compute_metrics, **trainer_kwargs)
    trainer = Trainer(model=current, args=training_args, train_dataset=train_dataset, **kwargs)
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if len(batches) >= config.calibration_batches:
            break
    metric_name, higher = metric_key(training_args, compute_metrics is not None)

    def evaluate(m: nn.Module) -> float:
        if eval_dataset is None:
            return _calibration_loss(trainer, m, batches)
        metrics = evaluate_model(m, training_args, eval_dataset, **kwargs)
        if metric_name not in metrics:
            raise ValueError(f"evaluation returned no {metric_name!r}; got {sorted(metrics)}")
        return float(metrics[metric_name])

    if eval_dataset is None:
        metric_name, higher = "eval_loss", False
    inputs = adapter_for(current).example_inputs(current, batch_size=1)
    report = CollapseReport(method="TLC", model_class=model_class_name(current), family=adapter_for(current).family,
                            unit_name="activation layers", metric_name=metric_name.removeprefix("eval_"),
                            higher_is_better=higher, hardware=hardware_description(),
                            budget={"target_layers": config.target_layers, "max_metric_drop": config.max_metric_drop},
                            extra={"fuse": config.fuse, "calibration_batches": len(batches),
                                   "finetune_steps": config.finetune_steps})
    baseline = evaluate(current)
    report.steps.append(CollapseStep(removed=0, unit=None, score=None, metric=baseline,
                                     **measure_step(current, inputs, 5)))
    limit = min(config.target_layers or len(remaining), len(remaining))
    progress = tqdm(total=limit, desc="TLC collapsing", disable=training_args.disable_tqdm or not is_main_process())
    while remaining and report.after.removed < limit:
        sites = [s for s in activation_sites(current) if s.name in remaining]
        stats = activation_statistics(current, batches, sites)
        reference = _calibration_loss(trainer, current, batches)
        gaps = {name: loss - reference for name, loss in _candidate_losses(trainer, current, stats, batches).items()}
        order = sorted(gaps, key=gaps.get)
        chosen = [order[0]]
        for name in order[1:min(config.candidates_per_step, limit - report.after.removed)]:  # the reference's "best k while the loss does not rise"
            if gaps[name] > 0:
                break
            chosen.append(name)
        trial = current
        for name in chosen:
            trial = linearize(trial, stats[name], fuse=config.fuse, inplace=trial is not current)
        finetune_losses = []
        if config.finetune_steps != 0:
            args = copy.deepcopy(training_args)
            if config.finetune_steps is not None:
                args.max_steps = config.finetune_steps
            tuner = Trainer(model=trial, args=args, train_dataset=train_dataset, **kwargs)
            tuner.train()
            finetune_losses = [h["loss"] for h in tuner.state.log_history if "loss" in h]
        metric = evaluate(trial)
        drop = baseline - metric if higher else metric - baseline
        kept = config.max_metric_drop is None or drop <= config.max_metric_drop
        details = [{"site": name, "neurons_on": stats[name].neurons_on, "neurons_off": stats[name].neurons_off,
                    "entropy": round(stats[name].entropy, 4), "statistics": stats[name].source} for name in chosen]
        report.steps.append(CollapseStep(
            removed=report.after.removed + len(chosen), unit=", ".join(chosen),
            score=float(sum(gaps[name] for name in chosen)), metric=metric, kept=kept,
            details={"sites": details, "neurons_on": sum(d["neurons_on"] for d in details),
                     "neurons_off": sum(d["neurons_off"] for d in details), "finetune_losses": finetune_losses},
            **measure_step(trial, inputs, 5 if kept else 0)))
        if not kept:
            logger.info("collapsing %s would drop %s by %.4f > %.4f: undone, stopping", chosen, metric_name, drop,
                        config.max_metric_drop)
            break
        current = trial
        remaining = [n for n in remaining if n not in chosen]
        progress.update(len(chosen))
    progress.close()
    return current, report

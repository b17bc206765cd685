"""The TLC loop: rank candidate sites by their calibration-loss gap, collapse the best, fine-tune, repeat.

The loop writes its progress after every step (see :mod:`hf_collapse.tlc.progress`) and continues from it with
``compress(..., resume_from=<progress_dir>)``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures.base import adapter_for, unwrap_model
from ..removal import evaluate_model, measure_step, metric_key
from ..distributed import is_main_process, sum_across_ranks
from ..metrics import device_of, hardware_description, to_device
from ..report import CollapseReport, CollapseStep
from ..surgery import EDIT_OPS, collapse_record, model_class_name
from . import progress as progress_format
from .config import TLCConfig
from .progress import ProgressFolder
from .statistics import SiteStatistics, activation_sites, activation_statistics, record_name
from .transforms import linearize, masked_identity

__all__ = ["compress"]

logger = logging.getLogger(__name__)

#: Where compress writes its progress by default, inside ``training_args.output_dir``.
PROGRESS_SUBDIR = "tlc_progress"


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


def _refuse_everywhere(problems: list[str], folder: Path) -> None:
    """Raise on every rank when any rank found a problem (a lone raising rank would leave the others waiting)."""
    failed = float(sum_across_ranks(torch.tensor([1.0 if problems else 0.0], dtype=torch.float64))[0])
    if failed:
        detail = "; ".join(problems) if problems else "another process refused it"
        raise ValueError(f"cannot resume TLC from {folder}: {detail}. Resume with the model, data, TLCConfig and "
                         "TrainingArguments of the interrupted run, or start over without resume_from")


def _compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    what = {"model_class": "the model class", "model_config": "the model's config", "model_weights":
            "the model's weights", "tlc_config": "the TLCConfig", "training": "the TrainingArguments",
            "world_size": "the number of processes", "data": "the calibration batches (train_dataset, collator or "
            "batch size)"}
    problems = []
    for key, label in what.items():
        if key == "data" and not is_main_process():
            continue  # each rank draws its own batches; the main process's digest is the saved one
        if saved.get(key) != current.get(key):
            if isinstance(current.get(key), dict) and isinstance(saved.get(key), dict):
                fields = sorted(k for k in set(saved[key]) | set(current[key]) if saved[key].get(k) != current[key].get(k))
                problems.append(f"{label} differ ({', '.join(f'{k}: {saved[key].get(k)!r} then, {current[key].get(k)!r} now' for k in fields)})")
            elif key == "model_class":
                problems.append(f"it was written for a {saved.get(key)}, not a {current.get(key)}")
            else:
                problems.append(f"{label} differ from the interrupted run's")
    return problems


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
    ``config.finetune_steps``, evaluated, and measured. The loop stops at ``config.target_layers``, before a step
    that would exceed ``config.max_metric_drop`` (that step is undone), or when nothing is left to collapse.

    After every step the main process writes the run's progress to ``progress_dir`` (the edits so far, the
    fine-tuned weights, the report so far, the random generators; format in :mod:`hf_collapse.tlc.progress`).
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

        >>> compressed, report = hf_collapse.tlc.compress(model, TLCConfig(target_layers=3), train, test, args,
        ...                                               compute_metrics=accuracy)
        >>> # interrupted? the same call with resume_from=f"{args.output_dir}/tlc_progress" continues it
        >>> report.save("outputs/tlc")
    """
    from transformers import Trainer, TrainingArguments

    if training_args is None:
        training_args = TrainingArguments("outputs/tlc", report_to=[], use_cpu=not torch.cuda.is_available())
    if config.max_metric_drop is not None and eval_dataset is None:
        raise ValueError("max_metric_drop needs an eval_dataset to evaluate the metric on")
    # Refuses gated / unknown sites first; names from here on are relative to the unwrapped copy `current`.
    remaining = [record_name(model, s.name) for s in activation_sites(model, config.sites)]
    original = unwrap_model(model)
    model_class = model_class_name(original)
    folder = ProgressFolder(progress_dir or resume_from or Path(training_args.output_dir) / PROGRESS_SUBDIR)
    if resume_from is None and folder.exists() and folder.read().get("status") != "finished":
        raise ValueError(f"{folder.path} holds an unfinished TLC run: pass resume_from={str(folder.path)!r} to "
                         "continue it, or delete the folder (or choose another progress_dir) to start over")
    current = copy.deepcopy(original)
    original_record = collapse_record(current)
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
    tlc_config = dataclasses.asdict(config)
    if config.sites != "auto":
        tlc_config["sites"] = list(remaining)
    fingerprint = {**progress_format.model_fingerprint(original, model_class),
                   "tlc_config": progress_format.json_safe(tlc_config),
                   "training": progress_format.training_fingerprint(training_args),
                   "world_size": int(training_args.world_size), "data": progress_format.batches_digest(batches)}

    def evaluate(m: nn.Module) -> float:
        if eval_dataset is None:
            return _calibration_loss(trainer, m, batches)
        metrics = evaluate_model(m, training_args, eval_dataset, **kwargs)
        if metric_name not in metrics:
            raise ValueError(f"evaluation returned no {metric_name!r}; got {sorted(metrics)}")
        return float(metrics[metric_name])

    def save_progress(status: str, weights: bool) -> None:
        if not is_main_process():
            return
        record = collapse_record(current)
        edits = record["edits"][len(original_record["edits"]) if original_record else 0:] if record else []
        state = {"status": status, "step": len(report.steps) - 1, "fingerprint": fingerprint, "remaining": remaining,
                 "edits": edits, "record": record, "rng": progress_format.rng_state(), "report": report.to_dict()}
        folder.write(state, current if weights else None, report.to_json())

    inputs = adapter_for(current).example_inputs(current, batch_size=1)
    # The uncollapsed model, on the device of the collapsed states it is timed beside.
    uncollapsed = copy.deepcopy(current).eval()
    if resume_from is not None:
        state = ProgressFolder(resume_from).read()
        _refuse_everywhere(_compare_fingerprints(state["fingerprint"], fingerprint), Path(resume_from))
        if state["status"] == "finished":
            raise ValueError(f"the TLC run in {resume_from} has already finished (its report is "
                             f"{Path(resume_from) / 'report.json'}); start a new run without resume_from")
        for edit in state["edits"]:
            EDIT_OPS[edit["op"]].replay(current, edit)
        if progress_format.json_safe(collapse_record(current)) != state["record"]:
            raise ValueError(f"replaying the edits saved in {resume_from} does not rebuild the recorded structure")
        ProgressFolder(resume_from).load_weights(current, state)
        report = CollapseReport.from_dict(state["report"])
        remaining = list(state["remaining"])
        progress_format.set_rng_state(state["rng"])
        logger.info("resuming TLC from %s after step %d (%d sites collapsed)", resume_from, state["step"],
                    report.after.removed)
    else:
        report = CollapseReport(method="TLC", model_class=model_class, family=adapter_for(current).family,
                                unit_name="activation layers", metric_name=metric_name.removeprefix("eval_"),
                                higher_is_better=higher, hardware=hardware_description(),
                                budget={"target_layers": config.target_layers,
                                        "max_metric_drop": config.max_metric_drop},
                                extra={"fuse": config.fuse, "calibration_batches": len(batches),
                                       "finetune_steps": config.finetune_steps})
        report.steps.append(CollapseStep(removed=0, unit=None, score=None, metric=evaluate(current),
                                         **measure_step(current, inputs, 5)))
        save_progress("running", weights=False)  # step 0: the weights are the original model's

    baseline = report.steps[0].metric
    limit = min(config.target_layers or len(remaining) + report.after.removed,
                len(remaining) + report.after.removed)
    bar = tqdm(total=limit, initial=report.after.removed, desc="TLC collapsing",
               disable=training_args.disable_tqdm or not is_main_process())
    try:
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
                # Checkpoints of this fine-tuning (if the arguments save any) belong to this step only: keep them
                # out of the user's output_dir, where each step would overwrite the last one's.
                args.output_dir = str(folder.path / "finetune")
                try:
                    tuner = Trainer(model=trial, args=args, train_dataset=train_dataset, **kwargs)
                    tuner.train()
                finally:
                    if is_main_process():
                        shutil.rmtree(args.output_dir, ignore_errors=True)
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
                **measure_step(trial, inputs, 5 if kept else 0, reference=uncollapsed)))
            if not kept:
                logger.info("collapsing %s would drop %s by %.4f > %.4f: undone, stopping", chosen, metric_name, drop,
                            config.max_metric_drop)
                break
            current = trial
            remaining = [n for n in remaining if n not in chosen]
            bar.update(len(chosen))
            save_progress("running", weights=True)
    except BaseException:
        if is_main_process() and folder.exists():
            logger.warning("TLC interrupted; the progress of its last finished step is in %s: call compress(..., "
                           "resume_from=%r) with the same arguments to continue", folder.path, str(folder.path))
        raise
    finally:
        bar.close()
    report.pool_reference_latency()
    save_progress("finished", weights=False)
    return current, report

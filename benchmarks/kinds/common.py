"""What the kinds share: the smoke-size rule of TraDy runs, the batches of the text tasks and report statistics."""

from __future__ import annotations

import random
import statistics


def smoke_size(settings: dict, resample_every_steps: int, **small) -> dict:
    """``settings`` shrunk to ``small``, seed 0, a 5% budget when it has one and re-sampling every
    ``resample_every_steps`` when it re-samples by steps: one smoke run per method and kind of re-sampling."""
    small["seed"] = 0
    if settings.get("budget_ratio") is not None:
        small["budget_ratio"] = 0.05
    if settings.get("resample_every_steps"):
        small["resample_every_steps"] = resample_every_steps
    return {**settings, **small}


def mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def std(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def bucketed_batches(rows: list[dict], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Indices of ``rows`` in length-bucketed batches (sorted chunks of 50 batches, shuffled): the same for every
    method at an epoch of a seed."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk, batches = batch_size * 50, []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(rows[i]["input_ids"]))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches

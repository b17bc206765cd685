"""What the kinds share: the smoke-size rule of TraDy runs and the statistics of their reports."""

from __future__ import annotations

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

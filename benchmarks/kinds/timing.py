"""What the speed kinds share: timing several states of a model side by side."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_seconds(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """The wall time of every call in each of ``rounds`` rounds, after one warm-up call each. The calls alternate
    within a round, so that a slow moment of the machine hits every state alike."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return seconds

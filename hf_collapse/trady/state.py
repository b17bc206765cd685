"""The one state object of a TraDy tuner: everything it knows beyond its modules and its config.

A :class:`TraDyState` hangs on the tuner (``tuner.trady_state``); calibration and sampling
(:mod:`~hf_collapse.trady.calibration`, :mod:`~hf_collapse.trady.sampling`) are functions over the tuner and it. What
a checkpoint must carry comes from here too (:func:`~hf_collapse.trady.sampling.export_run_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .selection import LayerCost

__all__ = ["AdapterState", "FlatStore", "TraDyState"]


class FlatStore:
    """A plain (non-Module) handle on the tuner's flat parameters, so that layers can take views of them without
    registering them as their own parameters (a deep copy keeps the sharing)."""

    def __init__(self, flat: nn.ParameterDict):
        self.flat = flat


@dataclass
class AdapterState:
    """What a calibrated adapter needs to draw channels (rebuilt from the config, never saved as such).

    Attributes:
        costs: the cost model of every target layer, in forward order.
        pool: the layers the strategy draws from.
        budget: the budget in elements.
        capacity: the size of the flat parameter.
        index: the epoch / re-sampling index of the current draw (``None`` before the first one).
        steps: optimizer steps counted by the optimizer hook.
        last_version: the flat parameter's version at the last counted step (one count per update).
        warned_no_callback: whether the "re-sampled by nobody" warning was given.
        history: ``(index, {layer: channels})`` of every draw so far.
    """

    costs: list[LayerCost]
    pool: list[LayerCost]
    budget: float
    capacity: int
    index: int | None = None
    steps: int = 0
    last_version: int = -1
    warned_no_callback: bool = False
    history: list[tuple[int, dict[str, int]]] = field(default_factory=list)


@dataclass
class TraDyState:
    """The state of a TraDy tuner.

    Attributes:
        store: the handle through which layers see the flat parameters.
        adapters: the run state of each calibrated adapter.
        driven: whether something re-samples the channels (a :class:`~hf_collapse.trady.TraDyCallback`, or a call of
            ``resample``): no warning then.
        sharding_checked: whether the first training forward checked for sharded parameters.
        step_hook: the handle of the optimizer hook that counts steps (``resample_every_steps``).
    """

    store: FlatStore
    adapters: dict[str, AdapterState] = field(default_factory=dict)
    driven: bool = False
    sharding_checked: bool = False
    step_hook: Any = None

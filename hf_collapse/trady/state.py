"""The one state object of a TraDy tuner: everything it knows beyond its modules and its config.

A :class:`TraDyState` hangs on the tuner (``tuner.trady_state``): the handle layers see the flat parameters through,
the channel sampler of each calibrated adapter (:class:`~hf_collapse.trady.sampling.ChannelSampler`) and the flags of
the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["FlatStore", "TraDyState"]


class FlatStore:
    """A plain (non-Module) handle on the tuner's flat parameters, so that layers can take views of them without
    registering them as their own parameters (a deep copy keeps the sharing)."""

    def __init__(self, flat: nn.ParameterDict):
        self.flat = flat


@dataclass
class TraDyState:
    """The state of a TraDy tuner.

    Attributes:
        store: the handle through which layers see the flat parameters.
        samplers: the channel sampler of each calibrated adapter
            (:class:`~hf_collapse.trady.sampling.ChannelSampler`).
        driven: whether something re-samples the channels (a :class:`~hf_collapse.trady.TraDyCallback`, or a call of
            ``resample``): no warning then.
        sharding_checked: whether the first training forward checked for sharded parameters.
        step_hook: the handle of the optimizer hook that counts steps (``resample_every_steps``).
    """

    store: FlatStore
    samplers: dict[str, Any] = field(default_factory=dict)
    driven: bool = False
    sharding_checked: bool = False
    step_hook: Any = None

"""What a block scorer is (:class:`Scorer`), the registry of scorers (:data:`SCORERS`), and the inputs a model takes.

A scorer says how much each unit (block, or attention / MLP sub-layer) changes what flows through it: a low score
means close to the identity, removed first. It declares what it needs (data, labels) and what it costs (forward
passes), and scores every unit of a model at once (:meth:`Scorer.score`). A new scorer is one file with one
:class:`Scorer` subclass (or a :class:`~hf_collapse.scoring.statistics.BatchStatistic`: a statistic of each unit's
input and output on one batch) and one registration: ``SCORERS.register(MyScorer())``. ``score_blocks``, ``prune``
and ``hf-collapse prune --method`` then offer it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..architectures.base import Block
from ..metrics import device_of, to_device
from ..registry import Registry

__all__ = ["SCORERS", "Scorer", "model_inputs"]


class Scorer:
    """A way to score units one shot: every unit of the model scored once, on calibration batches.

    Attributes:
        name: what ``method=`` names it by.
        description: a few words for ``--help`` and errors.
        needs_data: whether it measures the model on batches (``False``: e.g. the random baseline).
        needs_labels: whether the batches must carry labels (it measures a loss).
    """

    name: str = ""
    description: str = ""
    needs_data: bool = True
    needs_labels: bool = False

    def forward_passes(self, num_units: int, num_batches: int) -> int:
        """The forward passes of the model that scoring ``num_units`` units on ``num_batches`` batches costs."""
        return num_batches if self.needs_data else 0

    def score(
        self,
        model: nn.Module,
        dataloader: Iterable[Mapping[str, Any]] | None,
        units: Sequence[Block],
        *,
        max_batches: int | None = None,
        seed: int = 0,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, float]:
        """``{unit name: score}`` for ``units`` of ``model`` (lower: removed first), deterministic for a ``seed``,
        pooled over DDP ranks when each rank scores its own batches."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


#: The scorers of :func:`hf_collapse.score_blocks` and of the one-shot removals of :func:`hf_collapse.prune`.
SCORERS: Registry[Scorer] = Registry(
    "scoring method", how="add one with hf_collapse.scoring.SCORERS.register(<a Scorer>)"
)


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``model.forward`` accepts (a denoising batch carries its target as
    ``labels``, which a diffusers model does not take), moved to the model's device.

    A ``forward`` that takes ``**kwargs`` (as transformers models do) accepts every entry: nothing is dropped.

    Example::

        >>> from hf_collapse.scoring import model_inputs
        >>> sorted(batch)
        ['encoder_hidden_states', 'labels', 'sample', 'timestep']
        >>> sorted(model_inputs(unet, batch))                   # a diffusers UNet2DConditionModel
        ['encoder_hidden_states', 'sample', 'timestep']
    """
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return to_device({k: v for k, v in batch.items() if takes_any or k in parameters}, device_of(model))

"""Scorers that are a statistic of each unit's input and output on a batch (:class:`BatchStatistic`): one forward pass
per batch records every unit's input and output (padding zeroed), the statistic is averaged over batches weighted by
their size.

* ``"msw"``: Max-Sliced Wasserstein distance between the per-sample input and output features (LaCoOT);
* ``"block_influence"``: ShortGPT's 1 - cos(input, output), averaged over tokens / positions;
* ``"angular"``: Gromov et al.'s angular distance arccos(cos) / pi, averaged over tokens / positions.

A new one is a subclass with a ``name`` and a :meth:`BatchStatistic.statistic`, registered in
:data:`~hf_collapse.scoring.SCORERS`; :func:`register_statistic` does both for a plain function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures.base import Block
from ..block_io import BlockIO, feature_mask
from ..distributed import is_main_process, sum_across_ranks
from ..ot import max_sliced_wasserstein
from .base import SCORERS, Scorer, model_inputs

__all__ = ["AngularDistance", "BatchStatistic", "BlockInfluence", "MaxSlicedWasserstein", "register_statistic"]

#: ``(x, y, token_mask, generator) -> float``: a statistic of one unit's input and output on one batch.
Statistic = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Generator], float]


class BatchStatistic(Scorer):
    """A scorer that is a statistic of each unit's recorded input ``x`` and output ``y`` on one batch."""

    def statistic(
        self, x: torch.Tensor, y: torch.Tensor, token_mask: torch.Tensor | None, generator: torch.Generator, **options
    ) -> float:
        """The unit's score on one batch: ``x`` and ``y`` as recorded (padding zeroed), ``token_mask`` the real
        tokens of sequence features (``None`` otherwise), ``generator`` this unit's seeded generator."""
        raise NotImplementedError

    @torch.no_grad()
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
        generators = {b.name: torch.Generator().manual_seed(seed + i) for i, b in enumerate(units)}
        totals = {b.name: 0.0 for b in units}
        weight = 0
        was_training = model.training
        model.eval()
        io = BlockIO(model, units, detach=True)
        try:
            bar = tqdm(dataloader, desc=f"scoring blocks ({self.name})", disable=not (progress and is_main_process()))
            for step, batch in enumerate(bar):
                if max_batches is not None and step >= max_batches:
                    break
                batch = model_inputs(model, batch)
                with io.capturing(attention_mask=feature_mask(model, batch)):
                    model(**batch)
                size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                for unit in units:
                    x, y = io.raw(unit.name)
                    value = self.statistic(x, y, io.token_mask(unit.name), generators[unit.name], **options)
                    totals[unit.name] += size * value
                weight += size
        finally:
            io.remove()
            model.train(was_training)
        # Under DDP each rank scored its own shard: sum over ranks so that every rank removes the same units.
        reduced = sum_across_ranks(torch.tensor([weight, *totals.values()], dtype=torch.float64))
        weight, sums = float(reduced[0]), reduced[1:].tolist()
        if weight == 0:
            raise ValueError("the dataloader yielded no batches")
        return {name: total / weight for name, total in zip(totals, sums)}


def _per_position(x: torch.Tensor) -> torch.Tensor:
    """Rows of feature vectors: tokens for ``(B, T, H)``, spatial positions for ``(B, C, H, W)``."""
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)


def _cosine(x: torch.Tensor, y: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(_per_position(x.float()), _per_position(y.float()), dim=-1, eps=1e-8)
    if token_mask is not None:
        cos = cos[token_mask.reshape(-1)]
    return cos


class MaxSlicedWasserstein(BatchStatistic):
    name = "msw"
    description = "Max-Sliced Wasserstein distance between input and output features, LaCoOT"

    def statistic(self, x, y, token_mask, generator, **options) -> float:
        return float(max_sliced_wasserstein(x.flatten(1), y.flatten(1), generator=generator, **options))


class BlockInfluence(BatchStatistic):
    name = "block_influence"
    description = "ShortGPT: 1 - cosine of input and output"

    def statistic(self, x, y, token_mask, generator, **options) -> float:
        return float((1 - _cosine(x, y, token_mask)).mean())


class AngularDistance(BatchStatistic):
    name = "angular"
    description = "Gromov et al.: angular distance of input and output"

    def statistic(self, x, y, token_mask, generator, **options) -> float:
        return float((torch.arccos(_cosine(x, y, token_mask).clamp(-1, 1)) / math.pi).mean())


class _FunctionStatistic(BatchStatistic):
    def __init__(self, name: str, function: Statistic, description: str = ""):
        self.name, self.function, self.description = name, function, description

    def statistic(self, x, y, token_mask, generator, **options) -> float:
        return float(self.function(x, y, token_mask, generator, **options))


def register_statistic(name: str, function: Statistic, description: str = "", *, replace: bool = False) -> Scorer:
    """Register a plain function ``(x, y, token_mask, generator) -> float`` as the scorer ``name``.

    Example::

        >>> import torch
        >>> from hf_collapse.scoring import SCORERS, register_statistic
        >>> scorer = register_statistic("output_norm", lambda x, y, mask, generator: float(y.norm()), "|output|")
        >>> "output_norm" in SCORERS
        True
        >>> _ = SCORERS.unregister("output_norm")
    """
    return SCORERS.register(_FunctionStatistic(name, function, description), replace=replace)

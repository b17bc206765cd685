"""``"random"``: a seeded random score for every unit, the baseline every scorer must beat. It looks at no data."""

from __future__ import annotations

import torch

from .base import Scorer

__all__ = ["RandomScorer"]


class RandomScorer(Scorer):
    name = "random"
    description = "a seeded random score, the baseline"
    needs_data = False

    def score(self, model, dataloader, units, *, max_batches=None, seed=0, progress=True, **options):
        values = torch.rand(len(units), generator=torch.Generator().manual_seed(seed))
        return {unit.name: float(value) for unit, value in zip(units, values)}

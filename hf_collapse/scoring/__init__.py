"""Block scorers: how much each unit (block, or attention / MLP sub-layer) changes its input. Low score = close to the
identity, removed first.

Every scorer is an entry of one registry, :data:`SCORERS` (:class:`Scorer`: what it needs, what it costs, how it
scores); :func:`score_blocks` runs any of them. Built in:

* :mod:`~hf_collapse.scoring.statistics`: ``"msw"`` (LaCoOT), ``"block_influence"`` (ShortGPT), ``"angular"``
  (Gromov et al.), statistics of each unit's input and output on a batch;
* :mod:`~hf_collapse.scoring.loss`: ``"loss"`` (one-shot SLEB: the calibration loss without each unit);
* :mod:`~hf_collapse.scoring.baseline`: ``"random"``, the baseline every method must beat.

A new scorer is one file and one registration (``SCORERS.register(MyScorer())``, or
:func:`~hf_collapse.scoring.statistics.register_statistic` for a plain function of a unit's input and output).
"""

from .base import SCORERS, Scorer, model_inputs
from .baseline import RandomScorer
from .blocks import score_blocks
from .loss import LossScorer, loss_scores, loss_scores_and_reference
from .statistics import AngularDistance, BatchStatistic, BlockInfluence, MaxSlicedWasserstein, register_statistic

for _builtin in (MaxSlicedWasserstein(), BlockInfluence(), AngularDistance(), LossScorer(), RandomScorer()):
    SCORERS.register(_builtin)

__all__ = [
    "SCORERS",
    "AngularDistance",
    "BatchStatistic",
    "BlockInfluence",
    "LossScorer",
    "MaxSlicedWasserstein",
    "RandomScorer",
    "Scorer",
    "loss_scores",
    "loss_scores_and_reference",
    "model_inputs",
    "register_statistic",
    "score_blocks",
]

"""``score_blocks``: score the units of any model with any registered scorer (:data:`~hf_collapse.scoring.SCORERS`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..block_io import select_blocks
from .base import SCORERS

__all__ = ["score_blocks"]


@torch.no_grad()
def score_blocks(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    method: str = "msw",
    blocks: str | Sequence[str] = "auto",
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
    granularity: str = "block",
    **method_kwargs,
) -> dict[str, float]:
    """Score each block on calibration data; lower means closer to the identity (removed first).

    Args:
        model: a model of a supported family.
        dataloader: batches of model inputs (dicts of tensors); not needed by a scorer that looks at no data
            (``"random"``).
        method: a registered scorer (:data:`hf_collapse.scoring.SCORERS`): ``"msw"``, ``"block_influence"``,
            ``"angular"``, ``"loss"`` (SLEB: the calibration loss of the model without that unit; the batches must
            carry labels), ``"random"``, or one of yours.
        blocks: ``"auto"`` (every removable block) or a list of block names.
        max_batches: stop after this many batches.
        seed: seeds the MSW directions (and the random baseline): the scores are deterministic.
        progress: show a progress bar (on the main process only under DDP).
        granularity: the units to score: ``"block"`` (whole blocks), or for decoders ``"attention"`` / ``"mlp"``
            sub-layers, whose input is the residual stream entering the branch and whose output is that stream
            plus the branch's output (pass the same ``granularity`` to :func:`hf_collapse.collapse`).
        method_kwargs: passed to the scorer (for ``"msw"``: ``slicing``, ``n_projections``, ``ascent_steps``).

    Returns:
        ``{block name: score}``, averaged over batches weighted by batch size.

    Example::

        >>> scores = hf_collapse.score_blocks(model, calibration_loader, method="block_influence")
        >>> collapsed, report = hf_collapse.collapse(model, scores, num_units=2)
    """
    scorer = SCORERS.get(method)
    units = select_blocks(model, blocks, granularity)
    if scorer.needs_data and dataloader is None:
        what = "batches with labels" if scorer.needs_labels else "model inputs"
        raise ValueError(f"method {method!r} ({scorer.description}) measures on data: pass a dataloader of {what}")
    return scorer.score(
        model, dataloader, units, max_batches=max_batches, seed=seed, progress=progress, **method_kwargs
    )

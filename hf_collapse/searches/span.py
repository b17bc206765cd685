"""``"span"``: Gromov et al. / PruneMe: the contiguous span of ``num_units`` blocks whose input and output are closest,
removed at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..architectures.base import Block
from ..block_io import BlockIO
from ..engine import Budget, Candidate, SearchStrategy
from ..engine.progress import batches_digest
from ..scoring import model_inputs
from ..surgery import find_blocks, remove_blocks
from .base import Search

__all__ = ["Span", "SpanStrategy"]


class SpanStrategy(SearchStrategy):
    """Remove the contiguous span of ``length`` blocks whose input and output are closest, all at once (Gromov et al.,
    PruneMe): the angular distance ``arccos(cos(x, y)) / pi`` between the hidden state entering its first block and
    the one leaving its last, at each sequence's last real token (the one that has seen the whole sequence, left or
    right padding alike; a non-sequence feature map is compared whole), averaged over the calibration examples. One
    pass over the calibration batches with hooks on every block."""

    def __init__(self, model: nn.Module, batches: list[Mapping[str, Any]], length: int):
        self.batches, self.length = batches, int(length)
        self.spans: dict[tuple[str, ...], float] = {}
        self.done = False

    def measure(self, model: nn.Module) -> None:
        """The angular distance of every span of ``length`` consecutive blocks of one stage."""
        blocks = [b for b in find_blocks(model) if b.removable]
        stages: dict[int, list[Block]] = {}
        for block in blocks:
            stages.setdefault(block.stage, []).append(block)
        sums: dict[tuple[str, ...], float] = {}
        examples = 0
        io = BlockIO(model, blocks, detach=True)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    batch = model_inputs(model, batch)
                    with io.capturing():
                        model(**batch)
                    mask = batch.get("attention_mask")
                    for stage in stages.values():
                        for start in range(len(stage) - self.length + 1):
                            span = stage[start : start + self.length]
                            x = _last_token(io.raw(span[0].name)[0], mask)
                            y = _last_token(io.raw(span[-1].name)[1], mask)
                            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1)
                            key = tuple(b.name for b in span)
                            sums[key] = sums.get(key, 0.0) + float(torch.arccos(cos).sum()) / math.pi
                    examples += int(io.raw(blocks[0].name)[0].shape[0])
        finally:
            io.remove()
            model.train(was_training)
        self.spans = {span: total / max(examples, 1) for span, total in sums.items()}
        if not self.spans:
            raise ValueError(f"no stage of this model has {self.length} consecutive removable blocks")

    def available(self) -> int:
        return 0 if self.done else self.length

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        if self.done or room < self.length:
            return None
        span = min(self.spans, key=self.spans.get)
        return Candidate(units=list(span), score=self.spans[span], apply=lambda m: remove_blocks(m, list(span)))

    def accept(self, candidate: Candidate) -> None:
        self.done = True

    def state(self) -> dict[str, Any]:
        return {"done": self.done}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.done = bool(state["done"])

    def fingerprint(self) -> dict[str, Any]:
        return {"strategy": "span", "length": self.length, "data": batches_digest(self.batches)}

    def report_scores(self) -> dict[str, float]:
        return {" .. ".join((span[0], span[-1])): value for span, value in self.spans.items()}

    def cost(self) -> dict[str, Any]:
        return {"forward_passes": len(self.batches)}


def _last_token(hidden: Any, attention_mask: Any) -> Any:
    """``(batch, features)`` in float64: each sequence's last real token, or the whole feature map of an example."""
    hidden = hidden.double()
    if hidden.dim() != 3:
        return hidden.flatten(1)
    if attention_mask is None or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        return hidden[:, -1]
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    return hidden[torch.arange(hidden.shape[0]), last]


class Span(Search):
    name = "span"
    description = "PruneMe: the closest contiguous span of num_units blocks, at once"
    needs_labels = False

    def check(self, budget: Budget, granularity: str = "block", options=None) -> None:
        super().check(budget, granularity, options)
        if budget.num_units is None:
            raise ValueError("method 'span' removes num_units consecutive blocks at once: give num_units")

    def strategy(
        self, model, batches, budget, *, granularity="block", inputs, resume_from=None, progress=True, **options
    ):
        strategy = SpanStrategy(model, list(batches), budget.num_units)
        strategy.measure(model)
        return strategy, {}

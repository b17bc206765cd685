"""Searches that look again after every removal: ``"sleb"`` (SLEB: every remaining block re-scored by the
calibration loss of the current model without it) and ``"blockpruner"`` (BlockPruner / FinerCut: the same over
attention and MLP sub-layers; ``per_flop``: the least loss increase per parameter removed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..architectures.base import Block, adapter_for
from ..engine import Candidate, SearchStrategy
from ..engine.progress import batches_digest
from ..scoring import loss_scores_and_reference
from ..surgery import find_blocks, remove_blocks
from .base import Search

__all__ = ["BlockPruner", "IterativeLossStrategy", "Sleb"]


class _OriginalNames:
    """The original name of each block still in the model, in forward order (blocks are renumbered by a removal)."""

    def __init__(self, model: nn.Module):
        self.alive = [block.name for block in find_blocks(model)]

    def of(self, model: nn.Module, unit: Block) -> str:
        """``unit``'s name in the original model (a block, or a sub-layer of one)."""
        blocks = find_blocks(model)
        position = next(i for i, b in enumerate(blocks) if (b.stage, b.index) == (unit.stage, unit.index))
        return self.alive[position] + unit.name[len(blocks[position].name) :]

    def remove(self, original: str) -> None:
        if original in self.alive:
            self.alive.remove(original)


class IterativeLossStrategy(SearchStrategy):
    """Re-score every remaining unit on the current model at each step and remove the one whose removal costs the
    least calibration loss (SLEB: blocks; BlockPruner: attention and MLP sub-layers, a layer's last sub-layer taken
    as its whole block). Each step costs a forward pass per candidate and batch, from the candidate's input on where
    the blocks before it can replay one full pass (:func:`hf_collapse.scoring.loss_scores`).

    With ``per_flop``, the unit removed is the one whose removal costs the least loss increase per parameter it
    removes (its matrix multiplications' FLOPs), not the least loss: units of unequal size (an attention sub-layer
    holds a third of an MLP's weights in Llama-like layers) are then compared by what they cost for what they save,
    which is what a FLOPs budget asks. The loss before removal comes from the full forward pass the scoring replays
    (:func:`hf_collapse.scoring.loss_scores_and_reference`)."""

    def __init__(
        self, model: nn.Module, batches: list[Mapping[str, Any]], granularity: str = "block", per_flop: bool = False
    ):
        if granularity not in ("block", "sublayer"):
            raise ValueError(f"granularity must be 'block' or 'sublayer', got {granularity!r}")
        self.batches, self.granularity, self.per_flop = batches, granularity, bool(per_flop)
        self.unit_name = "blocks" if granularity == "block" else "sub-layers"
        self.names = _OriginalNames(model)
        self.removed: list[str] = []
        self.forward_passes = 0
        self._proposed: dict[str, str] = {}
        # never the last block: with every block removable, one unit (the last block's last sub-layer) always stays
        self._initial = len(self._pool(model)) - int(all(b.removable for b in find_blocks(model)))

    def _pool(self, model: nn.Module) -> list[Block]:
        blocks = find_blocks(model)
        if self.granularity == "block":
            return [b for b in blocks if b.removable]
        by_position = {(b.stage, b.index): b for b in blocks}
        pool = []
        for kind in adapter_for(model).sublayer_kinds:
            for unit in find_blocks(model, kind):
                if unit.removable:
                    pool.append(unit)
                else:  # the layer's other sub-layer is gone: removing this one empties the layer, a block removal
                    pool.append(by_position[(unit.stage, unit.index)])
        return list({unit.name: unit for unit in pool}.values())

    def available(self) -> int:
        # an upper bound (the pool is re-read from the model at each step; propose() says when it is empty)
        return max(self._initial - len(self.removed), 0)

    def propose(self, model: nn.Module, room: int) -> Candidate | None:
        pool = self._pool(model)
        if len(find_blocks(model)) == 1:  # never the last block
            pool = [u for u in pool if u.kind != "block"]
        if not pool:
            return None
        losses, before = loss_scores_and_reference(model, self.batches, pool, progress=False)
        self.forward_passes += (len(pool) + 1) * len(self.batches)
        scores = losses
        if self.per_flop:  # the loss increase per million parameters removed
            scores = {u.name: (losses[u.name] - before) * 1e6 / max(u.params, 1) for u in pool}
        name = min(scores, key=scores.get)
        unit = next(u for u in pool if u.name == name)
        details = {"calibration_loss": losses[name], "parameters": unit.params} if self.per_flop else {}
        original = self.names.of(model, unit)
        self._proposed[original] = unit.kind
        return Candidate(
            units=[original], score=scores[name], apply=lambda m: remove_blocks(m, [name]), details=details
        )

    def accept(self, candidate: Candidate) -> None:
        original = candidate.units[0]
        if self._proposed.get(original) == "block":
            self.names.remove(original)
        self.removed.append(original)

    def state(self) -> dict[str, Any]:
        return {"alive": list(self.names.alive), "removed": list(self.removed), "forward_passes": self.forward_passes}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.names.alive, self.removed = list(state["alive"]), list(state["removed"])
        self.forward_passes = int(state["forward_passes"])

    def fingerprint(self) -> dict[str, Any]:
        strategy = f"iterative loss{' per FLOP' if self.per_flop else ''} ({self.granularity})"
        return {"strategy": strategy, "data": batches_digest(self.batches)}

    def cost(self) -> dict[str, Any]:
        return {"forward_passes": self.forward_passes}


class Sleb(Search):
    name = "sleb"
    description = "SLEB: the block of least calibration loss removed, all re-scored after each removal"

    def strategy(
        self, model, batches, budget, *, granularity="block", inputs, resume_from=None, progress=True, **options
    ):
        return IterativeLossStrategy(model, list(batches), "block"), {}


class BlockPruner(Search):
    name = "blockpruner"
    description = "BlockPruner: attention and MLP sub-layers, re-scored by loss after each removal"
    removes = "sub-layers"
    options = ("per_flop",)

    def strategy(
        self, model, batches, budget, *, granularity="block", inputs, resume_from=None, progress=True, **options
    ):
        return IterativeLossStrategy(model, list(batches), "sublayer", bool(options.get("per_flop"))), {}

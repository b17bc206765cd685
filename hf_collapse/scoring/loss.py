"""SLEB's criterion as a scorer (``"loss"``): the calibration loss of the model with each unit removed, measured with
one forward pass per unit and batch from the unit's input on (the blocks before it replay one full pass), checked
against the true removal; :func:`loss_scores_and_reference` gives the model's own loss beside, for a loss increase.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures.base import Block
from ..distributed import is_main_process, sum_across_ranks
from ..surgery import find_blocks, remove_blocks, reverted
from .base import Scorer, model_inputs

__all__ = ["LossScorer", "loss_scores", "loss_scores_and_reference"]

logger = logging.getLogger(__name__)


class _Replay(nn.Module):
    """Stands in for a block before the one being scored: returns what the block returned in the full forward."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


class _Skip(nn.Module):
    """Stands in for the removed block: its input, shaped like the block's output (a residual block removed)."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        if isinstance(self.output, tuple):
            return (hidden_states, *self.output[1:])
        return hidden_states


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    original = owner.get_submodule(child)
    setattr(owner, child, module)
    return original


def _loss(outputs: Any) -> float:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0]
    if loss is None:
        raise ValueError("method 'loss' needs batches with labels (the model returned no loss)")
    return float(loss)


def _without(model: nn.Module, unit: Block, batch: Mapping[str, Any]) -> float:
    """The loss of ``model`` on ``batch`` with ``unit`` really removed: in place, then put back (no copy)."""
    with reverted(model):
        remove_blocks(model, [unit.name], inplace=True)
        return _loss(model(**batch))


@contextlib.contextmanager
def _stand_ins(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """``model`` with the modules at the given paths replaced, put back after."""
    swapped = {path: _swap(model, path, module) for path, module in modules.items()}
    try:
        yield
    finally:
        for path, original in swapped.items():
            _swap(model, path, original)


def _replayed(
    model: nn.Module,
    all_blocks: Sequence[Block],
    position: Mapping[str, int],
    unit: Block,
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
) -> float:
    """The loss without ``unit`` from its block's input on: the blocks before it return what they returned in the
    full forward pass (recorded in ``outputs``); a block unit returns its input, a sub-layer unit is removed in place
    (and put back) and its block runs without it."""
    replays = {b.path: _Replay(outputs[b.name]) for b in all_blocks[: position[unit.name]]}
    if unit.name in outputs:  # a whole block
        with _stand_ins(model, {**replays, unit.path: _Skip(outputs[unit.name])}):
            return _loss(model(**batch))
    with reverted(model):  # a sub-layer: removed first, on the whole model, then the blocks before it replayed
        remove_blocks(model, [unit.name], inplace=True)
        with _stand_ins(model, replays):
            return _loss(model(**batch))


def _replay_is_exact(
    model: nn.Module,
    all_blocks: Sequence[Block],
    position: Mapping[str, int],
    units: Sequence[Block],
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
) -> dict[str, float] | None:
    """Whether replaying the prefix gives the true removal's loss, checked on the first and the last unit: the last
    has the longest replayed prefix, where a model that records something in the blocks it skips (MoE router logits
    for an auxiliary loss) or that a removal changes beyond the block (a UNet skip pair) shows the difference.
    Returns the checked units' true losses where it does (``None`` where it does not), so that they are not measured
    twice. A sub-layer of the first block is not checked: with nothing before it to replay, its shortcut *is* the
    true removal."""
    checked = [units[0]] + ([units[-1]] if len(units) > 1 else [])
    exact_losses: dict[str, float] = {}
    for unit in checked:
        if unit.name not in outputs and position[unit.name] == 0:
            continue
        try:
            fast = _replayed(model, all_blocks, position, unit, outputs, batch)
        except Exception as error:  # noqa: BLE001 - any failure of the shortcut means: measure the true removal
            logger.info(
                "loss scoring: replaying the blocks before %s fails (%s: %s); measuring every candidate by "
                "removing it in place",
                unit.name,
                type(error).__name__,
                error,
            )
            return None
        exact = _without(model, unit, batch)
        if not abs(fast - exact) <= 1e-4 * max(1.0, abs(exact)):
            logger.info(
                "loss scoring: replaying the blocks before %s is not exact for this model (%s vs %s); "
                "measuring every candidate by removing it in place",
                unit.name,
                fast,
                exact,
            )
            return None
        exact_losses[unit.name] = exact
    return exact_losses


def loss_scores(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    units: Sequence[Block],
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """SLEB's criterion: the calibration loss of the model with each unit removed (lower: removed first).

    One forward pass per candidate and batch, from the input of the removed block (or of the block of a removed
    sub-layer) on: the blocks before it replay what they returned in one full forward pass, so only the blocks from
    it on run again. This shortcut is checked against the true removal on the first batch, on the first unit and on
    the last (whose replayed prefix is the longest); where it does not hold (a model whose skipped blocks record
    something the loss needs, e.g. MoE router logits, a removal that changes more than the block, e.g. a UNet skip
    pair), every candidate is measured with the unit really removed, in place and put back
    (:func:`hf_collapse.surgery.reverted`): no copy of the model is ever made. Losses are averaged over batches
    weighted by batch size and pooled over DDP ranks.

    Example::

        >>> scores = hf_collapse.score_blocks(llama, calibration_loader, method="loss")   # batches with labels
    """
    return _removal_losses(model, dataloader, units, max_batches, progress, reference=False)[0]


def loss_scores_and_reference(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    units: Sequence[Block],
    max_batches: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], float]:
    """:func:`loss_scores`, and the loss of ``model`` as it is on the same batches, averaged the same way: the
    reference a removal's loss increase is taken from (BlockPruner per FLOP). Where the shortcut holds, the full
    forward pass it replays already gives that loss; elsewhere it costs one more pass per batch."""
    scores, reference = _removal_losses(model, dataloader, units, max_batches, progress, reference=True)
    return scores, float(reference)


@torch.no_grad()
def _removal_losses(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    units: Sequence[Block],
    max_batches: int | None,
    progress: bool,
    reference: bool,
) -> tuple[dict[str, float], float | None]:
    all_blocks = find_blocks(model)
    position = {b.name: i for i, b in enumerate(all_blocks)}
    by_place = {(b.stage, b.index): i for i, b in enumerate(all_blocks)}
    for unit in units:  # a sub-layer unit runs from its block's input on
        position.setdefault(unit.name, by_place.get((unit.stage, unit.index), 0))
    units = sorted(units, key=lambda b: position[b.name])
    was_training = model.training
    model.eval()
    totals, weight, shortcut, reference_total = {b.name: 0.0 for b in units}, 0, None, 0.0
    try:
        bar = tqdm(dataloader, desc="scoring units (loss without each)", disable=not (progress and is_main_process()))
        for step, batch in enumerate(bar):
            if max_batches is not None and step >= max_batches:
                break
            batch = model_inputs(model, batch)
            size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
            outputs: dict[str, Any] = {}
            measured: dict[str, float] = {}  # the true losses the shortcut's check measured on the first batch
            if shortcut is not False:
                handles = [
                    model.get_submodule(b.path).register_forward_hook(
                        lambda module, args, output, name=b.name, kept=outputs: kept.__setitem__(name, output)
                    )
                    for b in all_blocks
                ]
                try:
                    full = model(**batch)
                finally:
                    for handle in handles:
                        handle.remove()
                if reference:
                    reference_total += size * _loss(full)
                if shortcut is None:
                    checked = _replay_is_exact(model, all_blocks, position, units, outputs, batch)
                    shortcut, measured = checked is not None, checked or {}
            elif reference:
                reference_total += size * _loss(model(**batch))
            for unit in units:
                if unit.name in measured:
                    loss = measured[unit.name]
                elif shortcut:
                    loss = _replayed(model, all_blocks, position, unit, outputs, batch)
                else:
                    loss = _without(model, unit, batch)
                totals[unit.name] += size * loss
            weight += size
    finally:
        model.train(was_training)
    reduced = sum_across_ranks(torch.tensor([weight, reference_total, *totals.values()], dtype=torch.float64))
    if float(reduced[0]) == 0:
        raise ValueError("the dataloader yielded no batches")
    losses = {name: float(total / reduced[0]) for name, total in zip(totals, reduced[2:].tolist())}
    return losses, float(reduced[1] / reduced[0]) if reference else None


class LossScorer(Scorer):
    """``"loss"``: :func:`loss_scores` as a one-shot scorer (the batches must carry labels)."""

    name = "loss"
    description = "SLEB, one shot: the calibration loss without each unit"
    needs_labels = True

    def forward_passes(self, num_units: int, num_batches: int) -> int:
        # a full pass and one replay per unit and batch, and the check of the shortcut on the first batch: the first
        # and the last unit replayed once more (their true removals are the losses kept). Where the shortcut does not
        # hold (a model whose skipped blocks record what the loss needs), each unit is removed in place instead.
        return (num_units + 1) * num_batches + min(num_units, 2)

    def score(self, model, dataloader, units, *, max_batches=None, seed=0, progress=True, **options):
        return loss_scores(model, dataloader, units, max_batches=max_batches, progress=progress)

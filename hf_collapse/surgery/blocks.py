"""Removing blocks and sub-layers: :func:`find_blocks`, :func:`remove_blocks`, and their recorded edits
``"remove_blocks"`` and ``"remove_sublayers"``."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..architectures.base import Block, adapter_for, join_path, module_path, unwrap_model
from ..names import resolve_names
from .record import collapse_record, locate, new_record, register_edit_op, write_record

__all__ = ["GRANULARITIES", "block_aliases", "find_blocks", "remove_blocks"]


GRANULARITIES = ("block", "attention", "mlp")


def find_blocks(model: nn.Module, granularity: str = "block") -> list[Block]:
    """The blocks of ``model`` in forward order, removable or not, named by their paths in ``model`` itself.

    Works through task heads and peft wrappers; every API that takes block names also accepts each block's
    ``aliases`` (its path relative to the backbone, and inside a wrapper). Example::

        >>> blocks = hf_collapse.find_blocks(model)             # a BertForSequenceClassification
        >>> [b.name for b in blocks if b.removable][:2]
        ['bert.encoder.layer.0', 'bert.encoder.layer.1']

    With ``granularity="attention"`` or ``"mlp"`` (decoder LMs), the units are each layer's self-attention or MLP
    sub-layer still present (``Block.kind`` says which), as FinerCut / BlockPruner remove them::

        >>> [b.name for b in hf_collapse.find_blocks(llama, granularity="attention")][:1]
        ['model.layers.0.self_attn']
        >>> smaller = hf_collapse.remove_blocks(llama, ["model.layers.0.self_attn"])   # layer 0 keeps its MLP

    Raises:
        ValueError: for a granularity other than ``"block"``, ``"attention"``, ``"mlp"``, or one the model's family
            does not support.
    """
    adapter, backbone, prefix = locate(model)
    if granularity == "block":
        units = adapter.blocks(backbone)
    elif granularity in GRANULARITIES and granularity in adapter.sublayer_kinds:
        units = adapter.sublayers(backbone, granularity)
    else:
        supported = ["block", *adapter.sublayer_kinds]
        raise ValueError(
            f"granularity {granularity!r} is not supported for family {adapter.family!r}; supported: "
            f"{', '.join(supported)}"
            + ("" if granularity in GRANULARITIES else f" (hf_collapse knows {', '.join(GRANULARITIES)})")
        )
    inner_prefix = module_path(unwrap_model(model), backbone)
    found = []
    for block in units:
        path = join_path(prefix, block.path)
        spellings = (block.name, join_path(inner_prefix, block.name))
        found.append(
            dataclasses.replace(
                block,
                name=path,
                path=path,
                local_name=block.name,
                aliases=tuple(dict.fromkeys(a for a in spellings if a != path)),
                input_path=join_path(prefix, block.input_path),
                output_path=join_path(prefix, block.output_path),
                extra_paths=tuple(join_path(prefix, p) for p in block.extra_paths),
            )
        )
    return found


def _sublayer_units(model: nn.Module) -> list[Block]:
    """Every sub-layer unit of ``model`` (all granularities but ``"block"``; none for most families)."""
    adapter = adapter_for(model)
    return [unit for kind in adapter.sublayer_kinds for unit in find_blocks(model, kind)]


def block_aliases(blocks: Sequence[Block]) -> dict[str, str]:
    """``{alias: name}`` over ``blocks``: the other spellings each block is accepted under."""
    return {alias: b.name for b in blocks for alias in b.aliases}


def _resolve(requested: Iterable[Block | str], blocks: Sequence[Block]) -> list[Block]:
    names = []
    for item in requested:
        key = item.name if isinstance(item, Block) else item
        if not isinstance(key, str):
            raise TypeError(f"blocks must be Block objects or block names, got {type(item).__name__}")
        names.append(key)
    resolved = resolve_names(
        names,
        {b.name: b for b in blocks},
        "block",
        aliases=block_aliases(blocks),
        where="this model (see hf_collapse.find_blocks)",
    )
    for block in resolved:
        if not block.removable:
            raise ValueError(f"block {block.name!r} is not removable: {block.reason}")
    return resolved


def remove_blocks(model: nn.Module, blocks: Iterable[Block | str], inplace: bool = False) -> nn.Module:
    """Remove ``blocks`` from ``model``; each removed residual block becomes the identity.

    Args:
        model: a model of a supported family, possibly under a task head or a peft wrapper.
        blocks: :class:`Block` objects from :func:`find_blocks`, or their names (or module paths).
        inplace: edit ``model`` itself; by default a modified deep copy is returned and ``model`` is untouched.

    Returns:
        The collapsed model. Its config says what changed (layer counts, ``depths``, ...) where the config can
        express it, and records the edit under ``config.hf_collapse`` in every case, so that
        ``save_pretrained`` + ``AutoCollapsedModel.from_pretrained`` rebuild it exactly.

        On a peft-wrapped model (``get_peft_model(model, LoraConfig(...))``) the result is the same wrapper
        around the collapsed model: it runs and trains as usual, but its ``save_pretrained`` / ``push_to_hub``
        raise (an adapter file cannot carry the collapse). Call ``merge_and_unload()`` first: the merged model is
        a plain collapsed model, with its record, that saves and reloads exactly. The same holds for every edit
        recorded on a peft model (``hf_collapse.collapse``, TLC's ``linearize``).

        Sub-layer units from ``find_blocks(model, granularity="attention" | "mlp")`` are accepted too: each
        becomes a parameter-free module returning zeros (its residual branch is ``x + 0``), the norms that only
        feed / follow it are dropped, and the edit is recorded as ``"remove_sublayers"``. No config can express
        that, so such a model reloads exactly with ``AutoCollapsedModel`` only (``plain_reload_exact`` False).

    Raises:
        ValueError: for an unknown name, a duplicate, a block that changes tensor shapes, an empty list, or a
            request that would remove every removable block; for sub-layers mixed with blocks in one call, or both
            sub-layers of one layer (remove that block instead).

    Example::

        >>> smaller = hf_collapse.remove_blocks(model, ["roberta.encoder.layer.2", "roberta.encoder.layer.4"])
        >>> smaller.save_pretrained("roberta-collapsed")
    """
    all_blocks = find_blocks(model)
    requested = list(blocks)
    try:
        chosen = _resolve(requested, all_blocks)
    except ValueError as error:  # maybe sub-layer units (looked up only then: most families have none)
        try:
            units = _sublayer_units(model)
        except ValueError as why:
            raise ValueError(f"{error} (sub-layer units: {why})") from None
        if not units:
            raise
        chosen = _resolve(requested, all_blocks + units)
    if any(b.kind != "block" for b in chosen):
        return _remove_sublayers(model, chosen, all_blocks, inplace)
    if len(chosen) >= len(all_blocks):
        raise ValueError(f"cannot remove all {len(all_blocks)} blocks of the model: keep at least one")

    if not inplace:
        model = copy.deepcopy(model)
    adapter, backbone, _ = locate(model)
    record = collapse_record(model) or new_record(model)
    names = [b.local_name for b in chosen]  # records hold backbone-relative names: they replay under any wrapper
    local = {b.name: b for b in adapter.blocks(backbone)}
    adapter.remove(backbone, [local[name] for name in names], record["base_values"])
    record["edits"].append({"op": "remove_blocks", "blocks": names})
    write_record(model, record)
    return model


def _remove_sublayers(model: nn.Module, chosen: list[Block], all_blocks: list[Block], inplace: bool) -> nn.Module:
    blocks = [b.name for b in chosen if b.kind == "block"]
    if blocks:
        raise ValueError(f"remove blocks ({', '.join(blocks)}) and sub-layers in separate remove_blocks calls")
    by_layer: dict[tuple[int, int], list[Block]] = {}
    for unit in chosen:
        by_layer.setdefault((unit.stage, unit.index), []).append(unit)
    owner = {(b.stage, b.index): b.name for b in all_blocks}
    for key, units in by_layer.items():
        if len(units) > 1:
            raise ValueError(
                f"{' and '.join(u.name for u in units)} are both sub-layers of {owner[key]!r}: removing "
                f"both empties the layer, which is a block removal: remove_blocks(model, "
                f"[{owner[key]!r}])"
            )
    if not inplace:
        model = copy.deepcopy(model)
    adapter, backbone, _ = locate(model)
    record = collapse_record(model) or new_record(model)
    names = [u.local_name for u in chosen]  # backbone-relative: replays under any wrapper
    local = {u.name: u for kind in adapter.sublayer_kinds for u in adapter.sublayers(backbone, kind)}
    adapter.remove_sublayers(backbone, [local[name] for name in names])
    record["edits"].append({"op": "remove_sublayers", "units": names})
    write_record(model, record)
    return model


def _validate_remove_blocks(edit: dict[str, Any]) -> None:
    if not isinstance(edit.get("blocks"), list) or not all(isinstance(n, str) for n in edit["blocks"]):
        raise ValueError(f"edit {edit!r} needs a list of block names")


register_edit_op(
    "remove_blocks", _validate_remove_blocks, lambda model, edit: remove_blocks(model, edit["blocks"], inplace=True)
)


def _validate_remove_sublayers(edit: dict[str, Any]) -> None:
    if (
        not isinstance(edit.get("units"), list)
        or not edit["units"]
        or not all(isinstance(n, str) for n in edit["units"])
    ):
        raise ValueError(f"edit {edit!r} needs a non-empty list of sub-layer names")


def _replay_remove_sublayers(model: nn.Module, edit: dict[str, Any]) -> None:
    chosen = _resolve(edit["units"], _sublayer_units(model))
    _remove_sublayers(model, chosen, find_blocks(model), inplace=True)


register_edit_op("remove_sublayers", _validate_remove_sublayers, _replay_remove_sublayers)

"""Structural surgery on Hugging Face models: find blocks, remove them, and record what was done.

Every structural edit is recorded under the ``hf_collapse`` key of the model's config, so a saved model can be
rebuilt exactly by :class:`hf_collapse.AutoCollapsedModel` even where the config alone cannot express the change.
The record is a plain JSON mapping::

    {
      "format_version": 1,
      "family": "swin",
      "model_class": "transformers.SwinForImageClassification",
      "base_values": {"depths": [2, 2]},            # config fields as they were before any edit
      "edits": [{"op": "remove_blocks", "blocks": ["encoder.layers.0.blocks.0"]}],
      "plain_reload_exact": false                   # whether plain from_pretrained rebuilds the same function
    }

Each edit kind is registered with :func:`register_edit_op` (a validator and a replay function):
``"remove_blocks"`` and ``"remove_sublayers"`` (attention / MLP sub-layers replaced by zeros) here, TLC's
``"linearize"`` in :mod:`hf_collapse.tlc.transforms`. Only block removals can
be expressed by a config; a record with any other edit always needs ``AutoCollapsedModel``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from .names import resolve_names
from .architectures.base import (
    ArchitectureAdapter,
    Block,
    adapter_for,
    config_get,
    config_set,
    join_path,
    module_path,
    unwrap_model,
)

__all__ = [
    "EDIT_OPS", "GRANULARITIES", "RECORD_FORMAT_VERSION", "RECORD_KEY", "collapse_record", "find_blocks", "record_edit",
    "register_edit_op", "remove_blocks",
]

RECORD_KEY = "hf_collapse"
RECORD_FORMAT_VERSION = 1


def _locate(model: nn.Module) -> tuple[ArchitectureAdapter, nn.Module, str]:
    """The adapter, the backbone it describes, and the backbone's path inside ``model``."""
    adapter = adapter_for(model)
    backbone = adapter.backbone(unwrap_model(model))
    return adapter, backbone, module_path(model, backbone)


def _owner(model: nn.Module) -> nn.Module:
    """The transformers / diffusers model that owns the config to record into (the task head if any)."""
    inner = unwrap_model(model)
    if getattr(inner, "config", None) is None:
        raise ValueError(f"{type(inner).__name__} has no config: hf_collapse works on transformers / diffusers models")
    return inner


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
    adapter, backbone, prefix = _locate(model)
    if granularity == "block":
        units = adapter.blocks(backbone)
    elif granularity in GRANULARITIES and granularity in adapter.sublayer_kinds:
        units = adapter.sublayers(backbone, granularity)
    else:
        supported = ["block", *adapter.sublayer_kinds]
        raise ValueError(f"granularity {granularity!r} is not supported for family {adapter.family!r}; supported: "
                         f"{', '.join(supported)}" + ("" if granularity in GRANULARITIES else
                                                      f" (hf_collapse knows {', '.join(GRANULARITIES)})"))
    inner_prefix = module_path(unwrap_model(model), backbone)
    found = []
    for block in units:
        path = join_path(prefix, block.path)
        spellings = (block.name, join_path(inner_prefix, block.name))
        found.append(dataclasses.replace(
            block, name=path, path=path, local_name=block.name,
            aliases=tuple(dict.fromkeys(a for a in spellings if a != path)),
            input_path=join_path(prefix, block.input_path), output_path=join_path(prefix, block.output_path),
            extra_paths=tuple(join_path(prefix, p) for p in block.extra_paths),
        ))
    return found


def _sublayer_units(model: nn.Module) -> list[Block]:
    """Every sub-layer unit of ``model`` (all granularities but ``"block"``; none for most families)."""
    adapter = adapter_for(model)
    return [unit for kind in adapter.sublayer_kinds for unit in find_blocks(model, kind)]


def block_aliases(blocks: Sequence[Block]) -> dict[str, str]:
    """``{alias: name}`` over ``blocks``: the other spellings each block is accepted under."""
    return {alias: b.name for b in blocks for alias in b.aliases}


def collapse_record(model: nn.Module) -> dict[str, Any] | None:
    """The ``hf_collapse`` record of ``model``'s config, or ``None`` for a model that was never edited.

    The record is a copy: changing it does not change the model's config.

    Example::

        >>> smaller = hf_collapse.remove_blocks(model, ["bert.encoder.layer.3"])
        >>> hf_collapse.collapse_record(smaller)["edits"]     # backbone-relative: replays under any wrapper
        [{'op': 'remove_blocks', 'blocks': ['encoder.layer.3']}]
        >>> hf_collapse.collapse_record(model) is None
        True
    """
    record = config_get(_owner(model), RECORD_KEY)
    return copy.deepcopy(record) if record is not None else None


def model_class_name(model: nn.Module) -> str:
    """``"transformers.BertModel"`` / ``"diffusers.UNet2DConditionModel"``: the importable public class."""
    cls = type(unwrap_model(model))
    library = cls.__module__.split(".")[0]
    return f"{library}.{cls.__name__}"


def _resolve(requested: Iterable[Block | str], blocks: Sequence[Block]) -> list[Block]:
    names = []
    for item in requested:
        key = item.name if isinstance(item, Block) else item
        if not isinstance(key, str):
            raise TypeError(f"blocks must be Block objects or block names, got {type(item).__name__}")
        names.append(key)
    resolved = resolve_names(names, {b.name: b for b in blocks}, "block", aliases=block_aliases(blocks),
                             where="this model (see hf_collapse.find_blocks)")
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
    adapter, backbone, _ = _locate(model)
    record = collapse_record(model) or _new_record(model)
    names = [b.local_name for b in chosen]  # records hold backbone-relative names: they replay under any wrapper
    local = {b.name: b for b in adapter.blocks(backbone)}
    adapter.remove(backbone, [local[name] for name in names], record["base_values"])
    record["edits"].append({"op": "remove_blocks", "blocks": names})
    _write_record(model, record)
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
            raise ValueError(f"{' and '.join(u.name for u in units)} are both sub-layers of {owner[key]!r}: removing "
                             f"both empties the layer, which is a block removal: remove_blocks(model, "
                             f"[{owner[key]!r}])")
    if not inplace:
        model = copy.deepcopy(model)
    adapter, backbone, _ = _locate(model)
    record = collapse_record(model) or _new_record(model)
    names = [u.local_name for u in chosen]  # backbone-relative: replays under any wrapper
    local = {u.name: u for kind in adapter.sublayer_kinds for u in adapter.sublayers(backbone, kind)}
    adapter.remove_sublayers(backbone, [local[name] for name in names])
    record["edits"].append({"op": "remove_sublayers", "units": names})
    _write_record(model, record)
    return model


def _new_record(model: nn.Module) -> dict[str, Any]:
    return {
        "format_version": RECORD_FORMAT_VERSION,
        "family": adapter_for(model).family,
        "model_class": model_class_name(model),
        "base_values": {},
        "edits": [],
    }


def _write_record(model: nn.Module, record: dict[str, Any]) -> None:
    adapter, backbone, _ = _locate(model)
    history = [edit["blocks"] for edit in record["edits"] if edit["op"] == "remove_blocks"]
    # Only block removals can ever be expressed by a config; any other edit needs AutoCollapsedModel.
    record["plain_reload_exact"] = all(edit["op"] == "remove_blocks" for edit in record["edits"]) and bool(
        adapter.config_expresses(backbone, record["base_values"], history))
    owner = _owner(model)
    config_set(owner, **{RECORD_KEY: record})
    if owner.config is not getattr(backbone, "config", owner.config):
        # A task head and its backbone usually share one config object; keep both in step if they do not.
        config_set(backbone, **{RECORD_KEY: record})
    if is_peft_model(model):
        _refuse_adapter_saves(model)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (LoRA, TraDy, ... wrapped around a transformers model)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


COLLAPSED_ADAPTER_MESSAGE = (
    "the model inside this peft wrapper was collapsed by hf_collapse, but a peft model saves only its adapter, "
    "whose base model (named in adapter_config.json) is the uncollapsed one: saving it would lose the collapse. "
    "Merge the adapter first: `model = model.merge_and_unload()` gives a plain collapsed {cls} (its "
    "`hf_collapse` record intact) that saves with `save_pretrained` / `hf_collapse.push_to_hub` and reloads "
    "exactly with `hf_collapse.AutoCollapsedModel.from_pretrained`."
)


def _refuse_adapter_saves(model: nn.Module) -> None:
    """Make ``save_pretrained`` / ``push_to_hub`` of this peft model (and of its copies) raise: see
    :data:`COLLAPSED_ADAPTER_MESSAGE`. Set on the instance, so peft's classes are untouched."""
    refusal = _AdapterSaveRefusal(type(unwrap_model(model)).__name__)
    model.save_pretrained = refusal
    model.push_to_hub = refusal


@dataclasses.dataclass(frozen=True)
class _AdapterSaveRefusal:
    """Stands in for the ``save_pretrained`` / ``push_to_hub`` of a collapsed peft model (picklable, copyable)."""

    model_class: str

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(COLLAPSED_ADAPTER_MESSAGE.format(cls=self.model_class))


def record_edit(model: nn.Module, edit: dict[str, Any]) -> None:
    """Append a structural edit (already applied to ``model``) to its ``hf_collapse`` record.

    ``edit["op"]`` must be registered with :func:`register_edit_op`, whose replay function rebuilds the same
    structure on a fresh model when ``AutoCollapsedModel`` loads it.

    Raises:
        ValueError: for an unregistered ``op``, or an edit its validator rejects.

    Example::

        >>> from hf_collapse.surgery import collapse_record, record_edit
        >>> bert_model.pooler = None                            # the edit itself (op registered beforehand)
        >>> record_edit(bert_model, {"op": "drop_pooler"})
        >>> collapse_record(bert_model)["plain_reload_exact"]   # only block removals reload with plain from_pretrained
        False
    """
    if edit.get("op") not in EDIT_OPS:
        raise ValueError(f"unknown edit operation {edit.get('op')!r}; registered: {', '.join(EDIT_OPS)}")
    EDIT_OPS[edit["op"]].validate(edit)
    record = collapse_record(model) or _new_record(model)
    record["edits"].append(copy.deepcopy(edit))
    _write_record(model, record)


@dataclasses.dataclass(frozen=True)
class EditOp:
    """How to check a recorded edit's fields, and how to replay it on a fresh model (in place)."""

    validate: Callable[[dict[str, Any]], None]
    replay: Callable[[nn.Module, dict[str, Any]], None]


#: The structural edits a record may hold: ``op`` name -> :class:`EditOp`.
EDIT_OPS: dict[str, EditOp] = {}


def register_edit_op(op: str, validate: Callable[[dict[str, Any]], None],
                     replay: Callable[[nn.Module, dict[str, Any]], None]) -> None:
    """Register a structural edit kind (``"remove_blocks"`` here, ``"linearize"`` in TLC).

    ``validate(edit)`` raises ``ValueError`` for a malformed edit; ``replay(model, edit)`` applies the edit in place
    to a freshly built model, before ``AutoCollapsedModel`` loads the saved weights into it. Registering an ``op``
    again replaces it.

    Example::

        >>> from hf_collapse.surgery import register_edit_op
        >>> register_edit_op("drop_pooler", validate=lambda edit: None,
        ...                  replay=lambda model, edit: setattr(model, "pooler", None))
    """
    EDIT_OPS[op] = EditOp(validate=validate, replay=replay)


def _validate_remove_blocks(edit: dict[str, Any]) -> None:
    if not isinstance(edit.get("blocks"), list) or not all(isinstance(n, str) for n in edit["blocks"]):
        raise ValueError(f"edit {edit!r} needs a list of block names")


register_edit_op("remove_blocks", _validate_remove_blocks,
                 lambda model, edit: remove_blocks(model, edit["blocks"], inplace=True))


def _validate_remove_sublayers(edit: dict[str, Any]) -> None:
    if not isinstance(edit.get("units"), list) or not edit["units"] or not all(isinstance(n, str) for n in edit["units"]):
        raise ValueError(f"edit {edit!r} needs a non-empty list of sub-layer names")


def _replay_remove_sublayers(model: nn.Module, edit: dict[str, Any]) -> None:
    chosen = _resolve(edit["units"], _sublayer_units(model))
    _remove_sublayers(model, chosen, find_blocks(model), inplace=True)


register_edit_op("remove_sublayers", _validate_remove_sublayers, _replay_remove_sublayers)


def validate_record(record: Any, *, family: str | None = None) -> dict[str, Any]:
    """Check an ``hf_collapse`` record read from a config; raise ``ValueError`` naming what is wrong."""
    def fail(why: str):
        raise ValueError(
            f"the '{RECORD_KEY}' record in this config is malformed or foreign ({why}); it must be written by "
            f"hf_collapse (format_version {RECORD_FORMAT_VERSION}). Remove the key to load the model as saved."
        )

    if not isinstance(record, dict):
        fail(f"expected a mapping, got {type(record).__name__}")
    if record.get("format_version") != RECORD_FORMAT_VERSION:
        fail(f"format_version is {record.get('format_version')!r}")
    for key, kind in (("family", str), ("model_class", str), ("base_values", dict), ("edits", list)):
        if not isinstance(record.get(key), kind):
            fail(f"'{key}' is missing or not a {kind.__name__}")
    if family is not None and record["family"] != family:
        fail(f"it was written for family {record['family']!r}, but the config describes a {family!r} model")
    for edit in record["edits"]:
        if not isinstance(edit, dict) or edit.get("op") not in EDIT_OPS:
            fail(f"unknown edit {edit!r}; known operations: {', '.join(EDIT_OPS)}")
        try:
            EDIT_OPS[edit["op"]].validate(edit)
        except ValueError as error:
            fail(str(error))
    return record

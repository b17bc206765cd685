"""The ``hf_collapse`` record: every structural edit, kept in the model's config so that a saved model rebuilds.

The record is a plain JSON mapping under the ``hf_collapse`` key of the config::

    {
      "format_version": 1,
      "family": "swin",
      "model_class": "transformers.SwinForImageClassification",
      "base_values": {"depths": [2, 2]},            # config fields as they were before any edit
      "edits": [{"op": "remove_blocks", "blocks": ["encoder.layers.0.blocks.0"]}],
      "plain_reload_exact": false                   # whether plain from_pretrained rebuilds the same function
    }

Each edit kind is an :class:`EditOp` (a validator and a replay function) registered with :func:`register_edit_op`. The
built-in ones are registered by the modules of this package, which ``hf_collapse.surgery`` imports, so a saved record
resolves wherever the package is imported (``AutoCollapsedModel`` imports it): ``"remove_blocks"`` and
``"remove_sublayers"`` (:mod:`~hf_collapse.surgery.blocks`), ``"linearize"`` (:mod:`~hf_collapse.surgery.linearize`).
Only block removals can be expressed by a config; a record with any other edit always needs ``AutoCollapsedModel``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ..architectures.base import ArchitectureAdapter, adapter_for, config_get, config_set, module_path, unwrap_model

__all__ = [
    "COLLAPSED_ADAPTER_MESSAGE",
    "EDIT_OPS",
    "RECORD_FORMAT_VERSION",
    "RECORD_KEY",
    "EditOp",
    "collapse_record",
    "edit_op",
    "is_peft_model",
    "known_edit_ops",
    "locate",
    "model_class_name",
    "new_record",
    "record_edit",
    "register_edit_op",
    "validate_record",
    "write_record",
]

RECORD_KEY = "hf_collapse"
RECORD_FORMAT_VERSION = 1


def locate(model: nn.Module) -> tuple[ArchitectureAdapter, nn.Module, str]:
    """The adapter, the backbone it describes, and the backbone's path inside ``model``."""
    adapter = adapter_for(model)
    backbone = adapter.backbone(unwrap_model(model))
    return adapter, backbone, module_path(model, backbone)


def owner(model: nn.Module) -> nn.Module:
    """The transformers / diffusers model that owns the config to record into (the task head if any)."""
    inner = unwrap_model(model)
    if getattr(inner, "config", None) is None:
        raise ValueError(f"{type(inner).__name__} has no config: hf_collapse works on transformers / diffusers models")
    return inner


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
    record = config_get(owner(model), RECORD_KEY)
    return copy.deepcopy(record) if record is not None else None


def model_class_name(model: nn.Module) -> str:
    """``"transformers.BertModel"`` / ``"diffusers.UNet2DConditionModel"``: the importable public class."""
    cls = type(unwrap_model(model))
    library = cls.__module__.split(".")[0]
    return f"{library}.{cls.__name__}"


def new_record(model: nn.Module) -> dict[str, Any]:
    return {
        "format_version": RECORD_FORMAT_VERSION,
        "family": adapter_for(model).family,
        "model_class": model_class_name(model),
        "base_values": {},
        "edits": [],
    }


def write_record(model: nn.Module, record: dict[str, Any]) -> None:
    adapter, backbone, _ = locate(model)
    history = [edit["blocks"] for edit in record["edits"] if edit["op"] == "remove_blocks"]
    # Only block removals can ever be expressed by a config; any other edit needs AutoCollapsedModel.
    record["plain_reload_exact"] = all(edit["op"] == "remove_blocks" for edit in record["edits"]) and bool(
        adapter.config_expresses(backbone, record["base_values"], history)
    )
    holder = owner(model)
    config_set(holder, **{RECORD_KEY: record})
    if holder.config is not getattr(backbone, "config", holder.config):
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
    op = edit_op(edit.get("op"))
    if op is None:
        raise ValueError(f"unknown edit operation {edit.get('op')!r}; registered: {', '.join(known_edit_ops())}")
    op.validate(edit)
    record = collapse_record(model) or new_record(model)
    record["edits"].append(copy.deepcopy(edit))
    write_record(model, record)


@dataclasses.dataclass(frozen=True)
class EditOp:
    """How to check a recorded edit's fields, and how to replay it on a fresh model (in place)."""

    validate: Callable[[dict[str, Any]], None]
    replay: Callable[[nn.Module, dict[str, Any]], None]


#: The structural edits a record may hold: ``op`` name -> :class:`EditOp`. The built-in ones are registered when
#: ``hf_collapse.surgery`` is imported (its ``__init__`` imports every module that defines one).
EDIT_OPS: dict[str, EditOp] = {}


def edit_op(op: Any) -> EditOp | None:
    """The registered :class:`EditOp` called ``op``; ``None`` for an op nobody registered."""
    return EDIT_OPS.get(op) if isinstance(op, str) else None


def known_edit_ops() -> list[str]:
    """Every op a record may name."""
    return list(EDIT_OPS)


def register_edit_op(
    op: str, validate: Callable[[dict[str, Any]], None], replay: Callable[[nn.Module, dict[str, Any]], None]
) -> None:
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
        op = edit_op(edit.get("op")) if isinstance(edit, dict) else None
        if op is None:
            fail(f"unknown edit {edit!r}; known operations: {', '.join(known_edit_ops())}")
        try:
            op.validate(edit)
        except ValueError as error:
            fail(str(error))
    return record

"""Injection: which modules TraDy wraps (the default targets, the checks on a user's ``target_modules``).

:class:`~hf_collapse.trady.TraDyModel`'s peft hooks replace every target conv/linear by a
:class:`~hf_collapse.trady.layer.TraDyLayer`.
"""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .. import compat
from .config import TraDyConfig
from .layer import channel_ops_for, supported_module_types

__all__ = ["check_targets", "default_target_modules"]


def default_target_modules(model: nn.Module, modules_to_save: Iterable[str] | None = None) -> list[str]:
    """Every module TraDy can target (Linear, dense or depthwise Conv2d, GPT-2 Conv1D), except the output embeddings
    (often tied to the input embeddings) and the ``modules_to_save`` (the task head), by full name.

    Example:
        >>> names = default_target_modules(bert_for_sequence_classification, ["classifier"])  # doctest: +SKIP
        >>> names[:2]                                                                          # doctest: +SKIP
        ['bert.encoder.layer.0.attention.self.query', 'bert.encoder.layer.0.attention.self.key']
    """
    output_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_embeddings = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    skip = [m for m in (modules_to_save or [])]
    names = []
    for name, module in model.named_modules():
        if not name or module is output_embeddings:
            continue
        if any(f".{m}." in f".{name}." for m in skip):
            continue
        try:
            ops = channel_ops_for(module)
        except TypeError:
            continue  # a grouped conv TraDy cannot slice: not a default target
        if ops is not None:
            names.append(name)
    return names


def check_targets(model: nn.Module, config: TraDyConfig) -> None:
    """Refuse ``config.target_modules`` that match nothing, or match a module TraDy cannot target (naming both)."""
    matched, unsupported = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        found = check_target_module_exists(config, name)
        if not found or compat.is_excluded_target(found):
            continue
        try:
            ops = channel_ops_for(module)
        except TypeError as error:
            unsupported.append(f"{name} ({error})")
            continue
        if ops is None:
            unsupported.append(f"{name} ({type(module).__name__})")
        else:
            matched.append(name)
    if unsupported:
        raise TypeError(
            f"TraDy cannot target {', '.join(unsupported[:5])}"
            f"{' ...' if len(unsupported) > 5 else ''}; supported: {supported_module_types()}. "
            "Narrow target_modules (names, suffixes or a regex) to those layers."
        )
    if not matched:
        examples = default_target_modules(model, config.modules_to_save)[:4]
        raise ValueError(
            f"TraDy: no module matches target_modules={config.target_modules!r} "
            f"(exclude_modules={config.exclude_modules!r}). Give module names or suffixes of "
            f"{supported_module_types()}, e.g. {examples}, or None for all of them."
        )

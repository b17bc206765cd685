"""The one validator of user-given names (blocks, activation sites, TraDy layers): every API that takes names
refuses the same mistakes with the same words, listing what is accepted."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

__all__ = ["resolve_names"]

T = TypeVar("T")


def _shown(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_names(
    requested: Iterable[str],
    known: Mapping[str, T],
    kind: str,
    *,
    aliases: Mapping[str, str] | None = None,
    where: str = "this model",
) -> list[T]:
    """The objects named by ``requested``, in the order given.

    Args:
        requested: names given by the user (canonical names or aliases).
        known: ``{canonical name: object}``, in the order to list them in errors.
        kind: what the names name, singular (``"block"``, ``"activation site"``, ``"TraDy layer"``).
        aliases: other accepted spellings, ``{alias: canonical name}`` (e.g. a block's path under a task head, or
            an old, backbone-relative path). A name that ends with ``"." + a known name`` (the same thing named
            through a wrapper, like peft's ``base_model.model.``) is accepted when exactly one known name fits.
        where: what holds the known names, for the error message.

    Raises:
        ValueError: for an empty request, an unknown name (listing the known ones), or a thing named more than
            once (under any of its spellings).

    Example::

        >>> import hf_collapse
        >>> from transformers import AutoModelForSequenceClassification
        >>> from hf_collapse.data import embedded_model_path
        >>> from hf_collapse.names import resolve_names
        >>> model = AutoModelForSequenceClassification.from_pretrained(embedded_model_path("minilm"))
        >>> blocks = {b.name: b for b in hf_collapse.find_blocks(model)}
        >>> [b.name for b in resolve_names(["bert.encoder.layer.1"], blocks, "block")]
        ['bert.encoder.layer.1']
        >>> resolve_names(["bert.encoder.layer.9"], blocks, "block")
        Traceback (most recent call last):
        ValueError: unknown block 'bert.encoder.layer.9'; the blocks of this model are: bert.encoder.layer.0, ...
    """
    aliases = aliases or {}
    requested = list(requested)
    if not requested:
        raise ValueError(f"no {kind}s given: name at least one of: {_shown(known)}")
    canonical = []
    for name in requested:
        if not isinstance(name, str):
            raise TypeError(f"{kind} names must be strings, got {type(name).__name__}")
        key = name if name in known else aliases.get(name)
        if key not in known:  # a name given through a wrapper (``base_model.model.<name>``) of the known model
            wrapped = {known_name for known_name in known if name.endswith("." + known_name)}
            key = wrapped.pop() if len(wrapped) == 1 else None
        if key not in known:
            raise ValueError(f"unknown {kind} {name!r}; the {kind}s of {where} are: {_shown(known)}")
        canonical.append(key)
    repeated = sorted({n for n in canonical if canonical.count(n) > 1})
    if repeated:
        raise ValueError(f"{kind} {repeated[0]!r} is named twice ({kind}s named more than once: {repeated})")
    return [known[name] for name in canonical]

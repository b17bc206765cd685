"""Activation sites by name: every spelling a user may give, the one a record holds, and the linearizable ones.

An :class:`~hf_collapse.architectures.base.ActivationSite` is a nonlinearity between two linear maps (what TLC
measures, and :mod:`~hf_collapse.surgery.linearize` turns into a linear map). Names are relative to the model passed
(``"bert.encoder.layer.3.intermediate.intermediate_act_fn"`` for a ``BertForSequenceClassification``); the name relative
to the family's backbone (the spelling of hf_collapse 0.1) and the name inside a peft wrapper are accepted too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from ..architectures.base import ActivationSite, adapter_for, join_path, module_path, unwrap_model
from ..names import resolve_names

__all__ = ["activation_sites", "all_sites", "record_name", "site_name", "site_spellings"]


def _rebase(site: ActivationSite, prefix: str) -> ActivationSite:
    """``site`` with every path prefixed by ``prefix`` (the backbone's path in some model)."""
    return dataclasses.replace(
        site,
        name=join_path(prefix, site.name),
        block=join_path(prefix, site.block) if site.block else "",
        activation=join_path(prefix, site.activation),
        producer=join_path(prefix, site.producer),
        consumer=join_path(prefix, site.consumer),
        norm=join_path(prefix, site.norm) if site.norm else None,
    )


def _backbone_prefixes(model: nn.Module) -> tuple[nn.Module, str, str]:
    """The backbone, its path in ``model`` (what the user passed) and its path in the unwrapped model (the
    transformers / diffusers model whose config holds the ``hf_collapse`` record)."""
    inner = unwrap_model(model)
    backbone = adapter_for(model).backbone(inner)
    return backbone, module_path(model, backbone), module_path(inner, backbone)


def all_sites(model: nn.Module) -> list[ActivationSite]:
    """Every activation site the adapter knows (gated and already linearized ones included), with names and
    paths relative to ``model`` itself (``model.get_submodule(site.activation)``)."""
    backbone, prefix, _ = _backbone_prefixes(model)
    return [_rebase(s, prefix) for s in adapter_for(model).activation_sites(backbone)]


def site_spellings(model: nn.Module) -> dict[str, set[str]]:
    """Every accepted spelling of a site name -> the model-relative names it may mean (one, unless ambiguous).

    Accepted: the name relative to ``model`` (``"bert.encoder.layer.0.intermediate.intermediate_act_fn"`` for a
    ``BertForSequenceClassification``), the name relative to the unwrapped transformers / diffusers model (what
    the ``hf_collapse`` record of a peft-wrapped model holds), and the backbone-relative name of earlier
    versions (``"encoder.layer.0.intermediate.intermediate_act_fn"``).
    """
    backbone, prefix, inner_prefix = _backbone_prefixes(model)
    spellings: dict[str, set[str]] = {}
    for site in adapter_for(model).activation_sites(backbone):
        canonical = join_path(prefix, site.name)
        for spelling in (canonical, join_path(inner_prefix, site.name), site.name):
            spellings.setdefault(spelling, set()).add(canonical)
    # A model-relative name always means itself, even where an older spelling of another site reads the same.
    return {spelling: {spelling} if spelling in targets else targets for spelling, targets in spellings.items()}


def site_name(model: nn.Module, name: str) -> str:
    """The name relative to ``model`` of the site called ``name`` in any accepted spelling (see
    :func:`site_spellings`).

    Raises:
        ValueError: for a name that is no site of ``model`` (listing some of its sites), or an older spelling
            that names two sites.

    Example::

        >>> from hf_collapse.tlc.statistics import site_name
        >>> site_name(model, "encoder.layer.0.intermediate.intermediate_act_fn")   # BertForSequenceClassification
        'bert.encoder.layer.0.intermediate.intermediate_act_fn'
    """
    return _resolve_sites(model, [name])[0].name


def _resolve_sites(model: nn.Module, names: list[str]) -> list[ActivationSite]:
    """The sites ``names`` name (any accepted spelling), through the library's one name validator."""
    spellings = site_spellings(model)
    for name in names:
        targets = spellings.get(name, set()) if isinstance(name, str) else set()
        if len(targets) > 1:
            raise ValueError(
                f"activation site name {name!r} is ambiguous in {type(model).__name__}: it may mean "
                f"{' or '.join(sorted(targets))}; use the name relative to the model"
            )
    known = {site.name: site for site in all_sites(model)}
    aliases = {spelling: next(iter(targets)) for spelling, targets in spellings.items() if spelling not in known}
    return resolve_names(
        names,
        known,
        "activation site",
        aliases=aliases,
        where=f"this {type(model).__name__} (names relative to it, see hf_collapse.tlc.activation_sites)",
    )


def record_name(model: nn.Module, name: str) -> str:
    """The spelling of site ``name`` that goes into the ``hf_collapse`` record: relative to the unwrapped
    transformers / diffusers model that owns the record (the class ``AutoCollapsedModel`` rebuilds), so the
    record replays whatever wrapper the site was named through."""
    backbone, prefix, inner_prefix = _backbone_prefixes(model)
    canonical = site_name(model, name)
    local = canonical[len(prefix) + 1 :] if prefix else canonical
    return join_path(inner_prefix, local)


def activation_sites(model: nn.Module, names: str | Iterable[str] = "auto") -> list[ActivationSite]:
    """The sites TLC may collapse: every linearizable (non-gated, not yet linearized) site, or those named.

    Site names and paths are relative to ``model`` (``model.get_submodule(site.activation)``), like
    :attr:`hf_collapse.Block.path`. Named sites may also be given relative to the family's backbone (the
    spelling of earlier versions, ``"encoder.layer.3.intermediate.intermediate_act_fn"`` for a BERT task
    model); they are returned in the order given, under their model-relative names.

    Raises:
        ValueError: for no, unknown, ambiguous, repeated or already linearized names, a gated site (GEGLU, SwiGLU:
            linearizing the gate leaves a bilinear map), or a model with no linearizable site.

    Example::

        >>> sites = hf_collapse.tlc.activation_sites(model)     # a BertForSequenceClassification, 6 layers
        >>> len(sites), sites[0].name
        (6, 'bert.encoder.layer.0.intermediate.intermediate_act_fn')
        >>> activation = model.get_submodule(sites[0].activation)
    """
    every = all_sites(model)
    # A linearized site's activation is the identity (diffusers: its GELU module became a linear or identity).
    live = [s for s in every if not isinstance(model.get_submodule(s.activation), (nn.Identity, nn.Linear))]
    if names == "auto":
        chosen = [s for s in live if not s.gated]
        if not chosen:
            gated = [s.name for s in live if s.gated]
            raise ValueError(
                "no activation site can be linearized"
                + (
                    f": the model's activations are gated (GEGLU / SwiGLU, e.g. {gated[0]}); linearizing a gate "
                    "leaves a bilinear map, not a linear one"
                    if gated
                    else ""
                )
            )
        return chosen
    names = [names] if isinstance(names, str) else list(names)
    chosen = _resolve_sites(model, names)
    for name, site in zip(names, chosen):
        if site not in live:
            raise ValueError(f"activation site {name!r} is already linearized (its activation is the identity)")
        if site.gated:
            raise ValueError(
                f"site {name!r} is gated (GEGLU / SwiGLU): linearizing the gate leaves a bilinear map "
                "(x * W x), not a linear one, so TLC cannot collapse it"
            )
    return chosen

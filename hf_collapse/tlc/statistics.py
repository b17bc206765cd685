"""Per-neuron pre-activation statistics of each activation site: mean β, standard deviation γ.

Where a BatchNorm directly precedes the activation (ResNet, MobileNetV2) its affine parameters give them
with no data, as in the TLC paper (the BN output is distributed with mean β = bias and std γ = |weight|).
Elsewhere (LayerNorm transformers, diffusers feed-forwards) they are measured with hooks on the producing
layer over several calibration batches, padding tokens excluded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ..architectures.base import ActivationSite, adapter_for, join_path, module_path, unwrap_model
from ..distributed import sum_across_ranks
from ..metrics import device_of, to_device
from ..names import resolve_names
from ..scoring import model_inputs

__all__ = ["SiteStatistics", "activation_sites", "activation_statistics", "site_name"]


@dataclass
class SiteStatistics:
    """The statistics of one site. ON neurons have β > 0; P(OFF) = Φ(−β/γ).

    ``mean`` (β) and ``std`` (γ) hold one value per neuron (channel); ``source`` says where they come from.

    Example::

        >>> stats = hf_collapse.tlc.activation_statistics(model, calibration_batches)     # all-MiniLM-L6-v2
        >>> s = stats["encoder.layer.0.intermediate.intermediate_act_fn"]
        >>> s.source, s.neurons_on + s.neurons_off
        ('measured', 1536)
        >>> linearized = hf_collapse.tlc.linearize(model, s)
    """

    site: ActivationSite
    mean: torch.Tensor
    std: torch.Tensor
    source: str  # "batchnorm" or "measured"

    @property
    def on(self) -> torch.Tensor:
        return self.mean > 0

    @property
    def neurons_on(self) -> int:
        return int(self.on.sum())

    @property
    def neurons_off(self) -> int:
        return int((~self.on).sum())

    @property
    def p_off(self) -> torch.Tensor:
        z = -self.mean / self.std.clamp_min(1e-12)
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))

    @property
    def entropy(self) -> float:
        """Mean binary entropy (bits) of the neurons' ON/OFF state: 0 when every neuron is always ON or OFF."""
        p = self.p_off.clamp(1e-12, 1 - 1e-12)
        return float((-(p * p.log2()) - (1 - p) * (1 - p).log2()).mean())


def _rebase(site: ActivationSite, prefix: str) -> ActivationSite:
    """``site`` with every path prefixed by ``prefix`` (the backbone's path in some model)."""
    return dataclasses.replace(
        site, name=join_path(prefix, site.name), block=join_path(prefix, site.block) if site.block else "",
        activation=join_path(prefix, site.activation), producer=join_path(prefix, site.producer),
        consumer=join_path(prefix, site.consumer), norm=join_path(prefix, site.norm) if site.norm else None)


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
    return _resolve(model, [name])[0].name


def _resolve(model: nn.Module, names: list[str]) -> list[ActivationSite]:
    """The sites ``names`` name (any accepted spelling), through the library's one name validator."""
    spellings = site_spellings(model)
    for name in names:
        targets = spellings.get(name, set()) if isinstance(name, str) else set()
        if len(targets) > 1:
            raise ValueError(f"activation site name {name!r} is ambiguous in {type(model).__name__}: it may mean "
                             f"{' or '.join(sorted(targets))}; use the name relative to the model")
    known = {site.name: site for site in all_sites(model)}
    aliases = {spelling: next(iter(targets)) for spelling, targets in spellings.items() if spelling not in known}
    return resolve_names(names, known, "activation site", aliases=aliases,
                         where=f"this {type(model).__name__} (names relative to it, see hf_collapse.tlc.activation_sites)")


def record_name(model: nn.Module, name: str) -> str:
    """The spelling of site ``name`` that goes into the ``hf_collapse`` record: relative to the unwrapped
    transformers / diffusers model that owns the record (the class ``AutoCollapsedModel`` rebuilds), so the
    record replays whatever wrapper the site was named through."""
    backbone, prefix, inner_prefix = _backbone_prefixes(model)
    canonical = site_name(model, name)
    local = canonical[len(prefix) + 1:] if prefix else canonical
    return join_path(inner_prefix, local)


def activation_sites(model: nn.Module, names: str | Iterable[str] = "auto") -> list[ActivationSite]:
    """The sites TLC may collapse: every linearizable (non-gated, not yet linearized) site, or those named.

    Site names and paths are relative to ``model`` (``model.get_submodule(site.activation)``), like
    :attr:`hf_collapse.Block.path`. Named sites may also be given relative to the family's backbone (the
    spelling of earlier versions, ``"encoder.layer.3.intermediate.intermediate_act_fn"`` for a BERT task
    model); they are returned in the order given, under their model-relative names.

    Raises:
        ValueError: for no, unknown, ambiguous, repeated or already linearized names, a gated site (GEGLU, SwiGLU: linearizing
            the gate leaves a bilinear map), or a model with no linearizable site.

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
                + (f": the model's activations are gated (GEGLU / SwiGLU, e.g. {gated[0]}); linearizing a gate "
                   "leaves a bilinear map, not a linear one" if gated else "")
            )
        return chosen
    names = [names] if isinstance(names, str) else list(names)
    chosen = _resolve(model, names)
    for name, site in zip(names, chosen):
        if site not in live:
            raise ValueError(f"activation site {name!r} is already linearized (its activation is the identity)")
        if site.gated:
            raise ValueError(f"site {name!r} is gated (GEGLU / SwiGLU): linearizing the gate leaves a bilinear map "
                             "(x * W x), not a linear one, so TLC cannot collapse it")
    return chosen


def _bn_statistics(model: nn.Module, site: ActivationSite) -> SiteStatistics:
    norm = model.get_submodule(site.norm)
    # On the CPU like measured statistics, whatever the model's device: they decide structure, not compute.
    return SiteStatistics(site, norm.bias.detach().float().cpu().clone(),
                          norm.weight.detach().float().abs().cpu().clone(), "batchnorm")


@torch.no_grad()
def activation_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] = (),
    sites: Iterable[ActivationSite] | None = None,
    max_batches: int | None = None,
) -> dict[str, SiteStatistics]:
    """β and γ of every site: from BatchNorm parameters where one precedes the activation, else measured on
    ``batches`` (dicts of model inputs, moved to the model's device here) with hooks on the producing layer,
    padding tokens excluded.

    Returns the statistics by site name, names relative to ``model`` (``sites`` may be named in any spelling
    :func:`activation_sites` accepts); the tensors are on the CPU.

    Example::

        >>> stats = activation_statistics(model, calibration_batches)
        >>> {name: s.neurons_on for name, s in stats.items()}
    """
    if sites is None:
        sites = activation_sites(model)
    else:
        by_name = {s.name: s for s in all_sites(model)}
        sites = [by_name[site_name(model, s.name)] for s in sites]
    result = {s.name: _bn_statistics(model, s) for s in sites if s.norm}
    measured = [s for s in sites if not s.norm]
    if not measured:
        return result

    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(site: ActivationSite):
        def hook(module, args, output):
            x = output.detach().float()
            if site.kind == "conv":
                x = x.transpose(1, -1)
            mask = mask_holder["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])
            sums[site.name] = sums.get(site.name, 0) + x.sum(0)
            squares[site.name] = squares.get(site.name, 0) + (x * x).sum(0)
            counts[site.name] = counts.get(site.name, 0) + x.shape[0]
        return hook

    handles = [model.get_submodule(s.producer).register_forward_hook(hook_for(s)) for s in measured]
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            batch = to_device(batch, device)
            mask_holder["mask"] = batch.get("attention_mask")
            model(**model_inputs(model, batch))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("no calibration batches: the statistics of LayerNorm models are measured on data")
    for site in measured:
        # Under DDP every rank measured its own batches: pool them so that all ranks make the same choices.
        n = float(sum_across_ranks(torch.tensor(counts[site.name], dtype=torch.float64)))
        mean = sum_across_ranks(sums[site.name]) / n
        var = (sum_across_ranks(squares[site.name]) / n - mean * mean).clamp_min(0)
        result[site.name] = SiteStatistics(site, mean.cpu(), var.sqrt().cpu(), "measured")
    return {s.name: result[s.name] for s in sites}

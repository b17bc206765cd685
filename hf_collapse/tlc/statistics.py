"""Per-neuron pre-activation statistics of each activation site: mean β, standard deviation γ.

Where a BatchNorm directly precedes the activation (ResNet, MobileNetV2) its affine parameters give them
with no data, as in the TLC paper (the BN output is distributed with mean β = bias and std γ = |weight|).
Elsewhere (LayerNorm transformers, diffusers feed-forwards) they are measured with hooks on the producing
layer over several calibration batches, padding tokens excluded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ..architectures.base import ActivationSite, adapter_for, join_path, module_path, unwrap_model
from ..distributed import sum_across_ranks
from ..scoring import model_inputs

__all__ = ["SiteStatistics", "activation_sites", "activation_statistics"]


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


def activation_sites(model: nn.Module, names: str | Iterable[str] = "auto") -> list[ActivationSite]:
    """The sites TLC may collapse: every linearizable (non-gated, not yet linearized) site, or those named.

    Site names and paths are relative to the family's backbone (see :class:`hf_collapse.ActivationSite`).
    Named sites are returned in the order given.

    Raises:
        ValueError: for unknown, repeated or already linearized names, a gated site (GEGLU, SwiGLU: linearizing
            the gate leaves a bilinear map), or a model with no linearizable site.

    Example::

        >>> sites = hf_collapse.tlc.activation_sites(model)     # all-MiniLM-L6-v2: one site per layer
        >>> len(sites), sites[0].name
        (6, 'encoder.layer.0.intermediate.intermediate_act_fn')
    """
    adapter = adapter_for(model)
    backbone = adapter.backbone(unwrap_model(model))
    every = adapter.activation_sites(backbone)
    # A linearized site's activation is the identity (diffusers: its GELU module became a linear or identity).
    live = [s for s in every if not isinstance(backbone.get_submodule(s.activation), (nn.Identity, nn.Linear))]
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
    by_name = {s.name: s for s in every}
    chosen = []
    for name in [names] if isinstance(names, str) else names:
        if name not in by_name:
            raise ValueError(f"unknown activation site {name!r}; sites: {', '.join(list(by_name)[:6])}, ...")
        site = by_name[name]
        if site in chosen:
            raise ValueError(f"activation site {name!r} is named twice")
        if site not in live:
            raise ValueError(f"activation site {name!r} is already linearized (its activation is the identity)")
        if site.gated:
            raise ValueError(f"site {name!r} is gated (GEGLU / SwiGLU): linearizing the gate leaves a bilinear map "
                             "(x * W x), not a linear one, so TLC cannot collapse it")
        chosen.append(site)
    return chosen


def _bn_statistics(backbone: nn.Module, site: ActivationSite) -> SiteStatistics:
    norm = backbone.get_submodule(site.norm)
    return SiteStatistics(site, norm.bias.detach().float().clone(), norm.weight.detach().float().abs().clone(),
                          "batchnorm")


@torch.no_grad()
def activation_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] = (),
    sites: Iterable[ActivationSite] | None = None,
    max_batches: int | None = None,
) -> dict[str, SiteStatistics]:
    """β and γ of every site: from BatchNorm parameters where one precedes the activation, else measured on
    ``batches`` (dicts of model inputs) with hooks on the producing layer, padding tokens excluded.

    Example::

        >>> stats = activation_statistics(model, calibration_batches)
        >>> {name: s.neurons_on for name, s in stats.items()}
    """
    inner = unwrap_model(model)
    adapter = adapter_for(model)
    backbone = adapter.backbone(inner)
    prefix = module_path(model, backbone)
    sites = list(sites) if sites is not None else activation_sites(model)
    result = {s.name: _bn_statistics(backbone, s) for s in sites if s.norm}
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

    handles = [model.get_submodule(join_path(prefix, s.producer)).register_forward_hook(hook_for(s)) for s in measured]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
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

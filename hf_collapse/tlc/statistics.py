"""Per-neuron pre-activation statistics of each activation site: mean β, standard deviation γ.

Where a BatchNorm directly precedes the activation (ResNet, MobileNetV2) its affine parameters give them
with no data, as in the TLC paper (the BN output is distributed with mean β = bias and std γ = |weight|).
Elsewhere (LayerNorm transformers, diffusers feed-forwards) they are measured with hooks on the producing
layer over several calibration batches, padding tokens excluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures.base import ActivationSite
from ..distributed import sum_across_ranks
from ..metrics import device_of, to_device
from ..scoring import model_inputs
from ..surgery.sites import activation_sites, all_sites, site_name

__all__ = ["SiteStatistics", "activation_statistics"]


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


def _bn_statistics(model: nn.Module, site: ActivationSite) -> SiteStatistics:
    norm = model.get_submodule(site.norm)
    # On the CPU like measured statistics, whatever the model's device: they decide structure, not compute.
    return SiteStatistics(
        site, norm.bias.detach().float().cpu().clone(), norm.weight.detach().float().abs().cpu().clone(), "batchnorm"
    )


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

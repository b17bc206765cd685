"""Linearizing an activation site, physically, and recording it: the ``"linearize"`` edit.

1. OFF neurons are removed: rows of the producing linear/conv and its bias, BatchNorm channels, columns of the
   consuming linear/conv. (When the producer or the consumer is a depthwise conv, or every channel is OFF, the channels
   cannot be cut without touching the neighbouring layers: their BatchNorm scale and shift are zeroed instead, which
   silences them.)
2. The activation becomes the identity for the ON neurons.
3. Fusion, when ``fuse=True`` and cheaper by FLOPs: a BatchNorm between the two maps folds into the producing
   conv; two linears become one ``in x out`` linear, or stay two thin linears of rank k when k ON neurons make
   that cheaper; a conv followed by a 1x1 conv becomes one conv.

The edit is recorded under the config's ``hf_collapse`` key as ``{"op": "linearize", "site": ..., "width": k,
"form": "pair" | "single", "bn_folded": bool, "cut": bool}``; replaying it on a fresh model builds the same
structure, and the saved weights fill it (``AutoCollapsedModel``). ``site`` is relative to the transformers /
diffusers model that owns the record (``"bert.encoder.layer.3.intermediate.intermediate_act_fn"``); records of
earlier versions name it relative to the backbone (``"encoder.layer.3.intermediate.intermediate_act_fn"``), and
replay still accepts that spelling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures.base import ActivationSite
from .record import record_edit, register_edit_op
from .sites import all_sites, record_name, site_name

__all__ = ["linearize_site"]


@dataclass
class _Affine:
    """A linear map or conv as plain tensors: weight ``(out, in, *kernel)`` and bias ``(out,)``."""

    weight: torch.Tensor
    bias: torch.Tensor
    conv: nn.Conv2d | None = None  # geometry (stride, padding, groups, ...) for convs

    @classmethod
    def of(cls, module: nn.Module) -> _Affine:
        """The map ``module`` computes; a peft LoRA layer's active, unmerged updates are folded into its weight
        (the fused map replaces the layer, so the adapter's update must live on in it)."""
        base = getattr(module, "base_layer", None)
        weight = (base if base is not None else module).weight.detach().clone()
        if base is not None:
            if getattr(module, "lora_magnitude_vector", None):
                raise ValueError(
                    f"TLC cannot fold a DoRA adapter on {type(base).__name__} into a fused map: "
                    "merge_and_unload() the peft model first"
                )
            merged = set(getattr(module, "merged_adapters", []))
            for name in getattr(module, "active_adapters", []):
                if name in getattr(module, "lora_A", {}) and name not in merged:
                    weight += module.get_delta_weight(name).detach().to(weight.dtype)
            module = base
        if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            weight = weight.t()
        out_features = weight.shape[0]
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else weight.new_zeros(out_features)
        return cls(weight, bias.clone(), module if isinstance(module, nn.Conv2d) else None)

    def module(self) -> nn.Module:
        if self.conv is None:
            linear = nn.Linear(
                self.weight.shape[1], self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device
            )
        else:
            c = self.conv
            linear = nn.Conv2d(
                self.weight.shape[1] * c.groups,
                self.weight.shape[0],
                c.kernel_size,
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
                bias=True,
                padding_mode=c.padding_mode,
                dtype=self.weight.dtype,
                device=self.weight.device,
            )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            linear.bias.copy_(self.bias)
        return linear

    def flops_per_position(self) -> int:
        return self.weight.numel()


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _fold_batchnorm(producer: _Affine, norm: nn.BatchNorm2d, keep: torch.Tensor) -> _Affine:
    scale = norm.weight.detach()[keep] / torch.sqrt(norm.running_var[keep] + norm.eps)
    weight = producer.weight * scale.view(-1, *([1] * (producer.weight.dim() - 1)))
    bias = (producer.bias - norm.running_mean[keep]) * scale + norm.bias.detach()[keep]
    return _Affine(weight, bias, producer.conv)


def _compose_with_pointwise(producer: _Affine, consumer: _Affine) -> _Affine | None:
    """``consumer ∘ producer`` as one map, when exact: the consumer is a linear, or a 1x1 conv without groups."""
    if producer.conv is None:
        return _Affine(consumer.weight @ producer.weight, consumer.weight @ producer.bias + consumer.bias)
    c = consumer.conv
    if (
        c is None
        or c.kernel_size != (1, 1)
        or c.stride != (1, 1)
        or c.groups != 1
        or producer.conv.groups != 1
        or c.padding not in (0, (0, 0))
    ):
        return None
    pointwise = consumer.weight[:, :, 0, 0]
    weight = torch.einsum("ok,kihw->oihw", pointwise, producer.weight)
    return _Affine(weight, pointwise @ producer.bias + consumer.bias, producer.conv)


def _apply(
    root: nn.Module,
    site: ActivationSite,
    keep: torch.Tensor,
    fuse: bool,
    form: str | None = None,
    cut: bool | None = None,
) -> dict[str, Any]:
    """Install the transformed modules (``site``'s paths are relative to ``root``); ``form`` / ``cut`` force the
    recorded structure on replay. Returns the edit, its site named as ``site`` names it."""
    producer_module = root.get_submodule(site.producer)
    consumer_module = root.get_submodule(site.consumer)
    producer, consumer = _Affine.of(producer_module), _Affine.of(consumer_module)
    keep = keep.to(producer.weight.device)
    norm = root.get_submodule(site.norm) if site.norm else None
    depthwise = consumer.conv is not None and consumer.conv.groups > 1
    grouped_producer = producer.conv is not None and producer.conv.groups > 1
    if cut is None:
        # A grouped (depthwise) producer or consumer ties channel c to its neighbours' channel c, and convs
        # cannot have zero channels: such sites are silenced instead of cut.
        cut = not depthwise and not grouped_producer and (len(keep) > 0 or producer.conv is None)
    channels = producer.weight.shape[0]
    if not cut:
        # Silence OFF channels instead of cutting them (a depthwise consumer maps channel c to channel c).
        silenced = torch.ones(channels, dtype=torch.bool, device=producer.weight.device)
        silenced[keep] = False
        if norm is not None:
            with torch.no_grad():
                norm.weight[silenced] = 0
                norm.bias[silenced] = 0
        else:
            producer.weight[silenced] = 0
            producer.bias[silenced] = 0
        keep = torch.arange(channels)
    producer = _Affine(producer.weight[keep], producer.bias[keep], producer.conv)
    consumer = _Affine(
        consumer.weight[:, keep] if consumer.conv is None or not depthwise else consumer.weight,
        consumer.bias,
        consumer.conv,
    )
    bn_folded = norm is not None and fuse
    if bn_folded:
        producer = _fold_batchnorm(producer, norm, keep)
    elif norm is not None:
        cut_norm = nn.BatchNorm2d(
            len(keep),
            eps=norm.eps,
            momentum=norm.momentum,
            affine=True,
            device=norm.weight.device,
            dtype=norm.weight.dtype,
        )
        with torch.no_grad():
            cut_norm.weight.copy_(norm.weight[keep])
            cut_norm.bias.copy_(norm.bias[keep])
            cut_norm.running_mean.copy_(norm.running_mean[keep])
            cut_norm.running_var.copy_(norm.running_var[keep])
        cut_norm.train(norm.training)
        _set(root, site.norm, cut_norm)

    fused = _compose_with_pointwise(producer, consumer) if (fuse and norm is None or bn_folded) else None
    pair_cost = producer.flops_per_position() + consumer.flops_per_position()
    if form is None:
        form = "single" if fused is not None and fused.flops_per_position() < pair_cost else "pair"
    if form == "single":
        if fused is None:
            raise ValueError(f"site {site.name!r} cannot be fused into one map")
        # The fused map takes the consumer's slot (model code and weight init expect a weight there, e.g.
        # GPT-2's c_proj); the producer's slot becomes the identity.
        new_producer, new_consumer = nn.Identity(), fused.module()
    else:
        if depthwise and cut:
            raise ValueError(f"site {site.name!r} has a depthwise consumer: its channels cannot be cut")
        new_producer = producer.module()
        new_consumer = consumer.module() if not depthwise else consumer_module
    # Diffusers' GELU module holds its projection: the projection replaces the whole activation module.
    if site.activation == site.producer.rpartition(".")[0]:
        _set(root, site.activation, new_producer)
    else:
        _set(root, site.producer, new_producer)
        _set(root, site.activation, nn.Identity())
    _set(root, site.consumer, new_consumer)
    if bn_folded:
        _set(root, site.norm, nn.Identity())
    return {
        "op": "linearize",
        "site": site.name,
        "width": int(len(keep)),
        "form": form,
        "bn_folded": bn_folded,
        "cut": bool(cut),
    }


def linearize_site(
    model: nn.Module, site: str, on: torch.Tensor, fuse: bool = True, inplace: bool = False
) -> nn.Module:
    """Linearize one activation site: remove the neurons ``on`` marks OFF (``False``), make the activation the
    identity for the others, and (``fuse=True``) fuse the maps that become adjacent when that is cheaper by FLOPs.

    Returns the transformed model (a copy unless ``inplace``); the edit is recorded in its config so that
    ``save_pretrained`` + ``AutoCollapsedModel.from_pretrained`` rebuild it exactly. ``site`` is the site's name in any
    spelling :func:`~hf_collapse.surgery.sites.activation_sites` accepts. TLC decides which neurons are ON from their
    pre-activation statistics (:func:`hf_collapse.tlc.linearize`).

    Raises:
        ValueError: for a gated site (GEGLU / SwiGLU: linearizing the gate leaves a bilinear map, not a linear one).

    Example::

        >>> from hf_collapse.surgery import linearize_site
        >>> on = torch.ones(1536, dtype=torch.bool)                 # every neuron ON: the activation becomes x -> x
        >>> smaller = linearize_site(bert, "bert.encoder.layer.3.intermediate.intermediate_act_fn", on)
    """
    found = _site_by_name(model, site)
    if found.gated:
        raise ValueError(
            f"site {found.name!r} is gated (GEGLU / SwiGLU): linearizing the gate leaves a "
            "bilinear map, not a linear one"
        )
    if not inplace:
        model = copy.deepcopy(model)
    found = _site_by_name(model, site)
    keep = torch.nonzero(torch.as_tensor(on), as_tuple=False).flatten()
    with torch.no_grad():
        edit = _apply(model, found, keep, fuse)
    edit["site"] = record_name(model, found.name)
    record_edit(model, edit)
    return model


def _site_by_name(model: nn.Module, name: str) -> ActivationSite:
    """The site of ``model`` called ``name`` (any accepted spelling), paths relative to ``model``."""
    canonical = site_name(model, name)
    return next(site for site in all_sites(model) if site.name == canonical)


def _validate(edit: dict[str, Any]) -> None:
    if not isinstance(edit.get("site"), str) or not isinstance(edit.get("width"), int) or edit["width"] < 0:
        raise ValueError(f"edit {edit!r} needs a site name and a non-negative width")
    if (
        edit.get("form") not in ("pair", "single")
        or not isinstance(edit.get("bn_folded"), bool)
        or not isinstance(edit.get("cut"), bool)
    ):
        raise ValueError(f"edit {edit!r} needs form 'pair' or 'single', and boolean bn_folded and cut")


def _replay(model: nn.Module, edit: dict[str, Any]) -> None:
    # Records of earlier versions name the site relative to the backbone: site_name maps either spelling.
    site = _site_by_name(model, edit["site"])
    with torch.no_grad():
        done = _apply(
            model,
            site,
            torch.arange(edit["width"]),
            fuse=edit["bn_folded"] or edit["form"] == "single",
            form=edit["form"],
            cut=edit["cut"],
        )
    done["site"] = record_name(model, site.name)
    record_edit(model, done)


register_edit_op("linearize", _validate, _replay)

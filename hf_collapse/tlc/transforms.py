"""TLC's transform of one activation site: :func:`linearize` from measured statistics, and the hook that ranks a
candidate without touching the structure (:func:`masked_identity`). The edit itself (cut, linearize, fuse, record) is
:func:`hf_collapse.surgery.linearize_site`."""

from __future__ import annotations

import torch
from torch import nn

from ..architectures.base import ActivationSite
from ..surgery import linearize_site
from .statistics import SiteStatistics

__all__ = ["linearize", "masked_identity"]


def masked_identity(site: ActivationSite, on: torch.Tensor):
    """A forward hook for the activation module that makes it the candidate transform: OFF neurons output 0,
    ON neurons pass their pre-activation through. Used to rank candidates without copying the model.

    Example::

        >>> from hf_collapse.tlc.transforms import masked_identity
        >>> activation = model.get_submodule(stats.site.activation)   # site paths are relative to the model
        >>> handle = activation.register_forward_hook(masked_identity(stats.site, stats.on))
        >>> loss = model(**batch).loss; handle.remove()                    # the loss as if the site were linearized
    """

    def hook(module, args, output):
        pre = module.proj(args[0]) if hasattr(module, "proj") else args[0]
        shape = [1] * pre.dim()
        shape[1 if site.kind == "conv" else -1] = -1
        return pre * on.to(pre.device, pre.dtype).view(shape)

    return hook


def linearize(model: nn.Module, stats: SiteStatistics, fuse: bool = True, inplace: bool = False) -> nn.Module:
    """Apply the TLC transform of one site: remove its OFF neurons (mean pre-activation β <= 0), make its activation
    the identity for the ON ones, and (``fuse=True``) fuse the maps that become adjacent when that is cheaper.

    Returns the transformed model (a copy unless ``inplace``); the edit is recorded in its config so that
    ``save_pretrained`` + ``AutoCollapsedModel.from_pretrained`` rebuild it exactly. ``stats`` may come from
    ``model`` or from a copy of it (its site is looked up by name, in any spelling
    :func:`~hf_collapse.tlc.activation_sites` accepts).

    Example::

        >>> stats = activation_statistics(model, batches)       # a BertForSequenceClassification
        >>> model = linearize(model, stats["bert.encoder.layer.3.intermediate.intermediate_act_fn"])
    """
    return linearize_site(model, stats.site.name, stats.on, fuse=fuse, inplace=inplace)

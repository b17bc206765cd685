"""Parameter-free stand-ins for removed sub-layers (an attention or an MLP inside a residual layer).

Removing a sub-layer (as FinerCut and BlockPruner do) turns its residual branch into ``x + 0``: the sub-layer is
replaced by a module that returns zeros of the right shape, in the output form the layer expects, and the norms
that only feed (or only follow) it become :class:`torch.nn.Identity`. None of them holds a parameter, so the
removed weights are gone from the state dict and a reload (``AutoCollapsedModel``) rebuilds the same modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SUBLAYER_KINDS", "ZeroAttention", "ZeroMLP", "is_removed_sublayer"]

#: The sub-layer granularities ``find_blocks`` may be asked for, besides ``"block"``.
SUBLAYER_KINDS = ("attention", "mlp")


def _hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    value = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(value, torch.Tensor):
        raise TypeError("a removed sub-layer was called without hidden_states")
    return value


class ZeroAttention(nn.Module):
    """A removed self-attention: returns ``(zeros_like(hidden_states), None)`` as transformers' attention modules
    return ``(attn_output, attn_weights)``.

    It still writes one zero key / value of width 1 per token into the KV cache at its ``layer_idx``: the cache keeps
    one entry per layer, and transformers reads the number of cached tokens from a layer's entry (layer 0 when it
    computes positions), so an attention-less layer must keep its slot's length in step with the others.
    ``is_causal`` stays set so the layer is still recognised as a decoder layer.
    """

    is_causal = True

    def __init__(self, layer_idx: int | None = None, outputs: int = 2):
        super().__init__()
        self.layer_idx = layer_idx
        self.outputs = outputs

    def forward(self, *args: Any, **kwargs: Any):
        hidden_states = _hidden_states(args, kwargs)
        cache = _find_cache(args, kwargs)
        if cache is not None and self.layer_idx is not None:
            batch, tokens = hidden_states.shape[:2]
            stub = hidden_states.new_zeros(batch, 1, tokens, 1)
            cache.update(stub, stub.clone(), self.layer_idx)
        zeros = torch.zeros_like(hidden_states)
        return (zeros, *([None] * (self.outputs - 1))) if self.outputs > 1 else zeros

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class ZeroMLP(nn.Module):
    """A removed MLP: returns ``zeros_like(hidden_states)``."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(_hidden_states(args, kwargs))


def _find_cache(args: tuple, kwargs: dict[str, Any]):
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def is_removed_sublayer(module: nn.Module) -> bool:
    return isinstance(module, (ZeroAttention, ZeroMLP))

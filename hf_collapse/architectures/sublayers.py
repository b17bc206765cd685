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

from .base import Block, count_parameters

__all__ = [
    "MLP_NAMES",
    "SUBLAYER_KINDS",
    "ResidualSublayers",
    "ZeroAttention",
    "ZeroMLP",
    "branch_norms",
    "causal_attention_name",
    "is_removed_sublayer",
    "mlp_name",
]

#: The sub-layer granularities ``find_blocks`` may be asked for, besides ``"block"``.
SUBLAYER_KINDS = ("attention", "mlp")
#: Names of a layer's MLP child in transformers' decoder layers (besides classes named ``...MLP``).
MLP_NAMES = ("mlp", "feed_forward", "ffn")


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


def causal_attention_name(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if getattr(child, "is_causal", None) is True:
            return name
    return None


def mlp_name(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if name in MLP_NAMES or type(child).__name__.endswith("MLP"):
            return name
    return None


def branch_norms(layer: nn.Module) -> dict[str, tuple[list[str], list[str]]]:
    """``{"attention": (pre-norms, post-norms), "mlp": (...)}``: the norms of ``layer`` that only feed (pre) or
    only follow (post) each residual branch, by the names transformers' decoder layers use.

    Raises ``ValueError`` when ``layer`` has a norm these rules do not place: its role is unknown, and removing a
    branch while keeping it could silently change the function.
    """
    names = [name for name, _ in layer.named_children()]

    def present(*candidates: str) -> list[str]:
        return [c for c in candidates if c in names]

    if "ln_1" in names:  # GPT-2: ln_1 feeds the attention, ln_2 the MLP
        roles = {"attention": (present("ln_1"), []), "mlp": (present("ln_2"), [])}
    elif "pre_feedforward_layernorm" in names:  # Gemma 2/3: a norm before and after each branch
        roles = {
            "attention": (present("input_layernorm"), present("post_attention_layernorm")),
            "mlp": (present("pre_feedforward_layernorm"), present("post_feedforward_layernorm")),
        }
    elif "input_layernorm" not in names and "post_feedforward_layernorm" in names:  # OLMo2: norms after branches
        roles = {
            "attention": ([], present("post_attention_layernorm")),
            "mlp": ([], present("post_feedforward_layernorm")),
        }
    else:  # pre-norm layers (Llama, Qwen, Mistral, Phi3, GPT-NeoX, ...): post_attention_layernorm feeds the MLP
        roles = {
            "attention": (present("input_layernorm"), []),
            "mlp": (present("post_attention_layernorm"), present("post_feedforward_layernorm")),
        }
    placed = {n for pre, post in roles.values() for n in (*pre, *post)}
    unplaced = [
        n
        for n, child in layer.named_children()
        if n not in placed and ("norm" in n.lower() or "norm" in type(child).__name__.lower())
    ]
    if unplaced:
        raise ValueError(
            f"{type(layer).__name__} has norms {unplaced} whose branch (attention or MLP) hf_collapse "
            "cannot tell: sub-layer removal is not supported for this family; remove whole blocks"
        )
    return roles


class ResidualSublayers:
    """Attention and MLP sub-layer units for an adapter whose layers are pre-norm (or post-norm) residual layers
    with one causal self-attention and one MLP child (decoders recognised by structure, GPT-2).

    The adapter provides ``layers(backbone)`` (the ``ModuleList``) and ``layers_prefix(backbone)`` (its path).
    """

    def layers_prefix(self, backbone: nn.Module) -> str:
        return self.layers_path

    sublayer_kinds = SUBLAYER_KINDS

    def _branch(self, layer: nn.Module, kind: str) -> str:
        return causal_attention_name(layer) if kind == "attention" else mlp_name(layer)

    def sublayers(self, backbone: nn.Module, kind: str) -> list[Block]:
        """One unit per layer whose ``kind`` branch is still there: the branch module with the norms that only
        feed / follow it. Its input is the residual stream entering the branch, its output that stream plus the
        branch's output (``output_adds_input``). A layer whose other branch was removed already lists its last
        branch as not removable: removing it would empty the layer, which is a block removal."""
        attr = self.layers_prefix(backbone)
        other = "mlp" if kind == "attention" else "attention"
        units = []
        for i, layer in enumerate(self.layers(backbone)):
            branch = self._branch(layer, kind)
            module = getattr(layer, branch)
            if is_removed_sublayer(module):
                continue
            pre, post = branch_norms(layer)[kind]
            prefix = f"{attr}.{i}"
            name = f"{prefix}.{branch}"
            emptied = is_removed_sublayer(getattr(layer, self._branch(layer, other)))
            units.append(
                Block(
                    name=name,
                    path=name,
                    stage=0,
                    index=i,
                    kind=kind,
                    output_adds_input=True,
                    params=count_parameters(module) + sum(count_parameters(getattr(layer, n)) for n in (*pre, *post)),
                    input_path=f"{prefix}.{pre[0]}" if pre else name,
                    output_path=f"{prefix}.{post[-1]}" if post else name,
                    extra_paths=tuple(f"{prefix}.{n}" for n in (*pre, *post)),
                    removable=not emptied,
                    reason=f"the {other} of {prefix} was removed already: remove the whole block {prefix!r} instead"
                    if emptied
                    else "",
                )
            )
        return units

    def remove_sublayers(self, backbone: nn.Module, units: list[Block]) -> None:
        layers = self.layers(backbone)
        for unit in units:
            layer = layers[unit.index]
            pre, post = branch_norms(layer)[unit.kind]
            branch = self._branch(layer, unit.kind)
            setattr(layer, branch, ZeroAttention(layer_idx=unit.index) if unit.kind == "attention" else ZeroMLP())
            for norm in (*pre, *post):  # a norm that only feeds / follows the branch: x + 0 needs none of it
                setattr(layer, norm, nn.Identity())

"""Decoder-only causal LMs of any family, recognised by structure rather than by a list of model types.

A backbone is a decoder when one of its children is a ``ModuleList`` of layers that each hold a causal
self-attention module (``is_causal`` set, as transformers' attention classes do) and an MLP, next to a final
norm. Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, OLMo2, GPT-NeoX, SmolLM3, Granite and their relatives all fit.

Removing layers updates everything that is per layer: the ``ModuleList``, ``num_hidden_layers``, every top-level
config list with one entry per layer (``layer_types``, SmolLM3's ``no_rope_layers``, ...), Qwen's
``max_window_layers`` and the ``layer_idx`` of every module (KV-cache slots). Whether a plain ``from_pretrained``
of the updated config rebuilds the same model is checked, not assumed: a copy of the architecture is built
from the updated config on the ``meta`` device and its per-layer settings (sliding window, rope on/off, scaling,
...) are compared with the collapsed model's.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .base import (ArchitectureAdapter, Block, config_get, config_set, count_parameters, register_architecture,
                   replace_children)
from .common import mlp_site, renumber_layer_idx, text_inputs
from .sublayers import SUBLAYER_KINDS, ZeroAttention, ZeroMLP, is_removed_sublayer

logger = logging.getLogger(__name__)

# Top-level config lists that never hold one entry per layer, even when their length happens to match.
NOT_PER_LAYER = frozenset({
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "forced_decoder_ids", "id2label", "label2id", "task_specific_params",
})
# Top-level config lists of layer *indices* (not one entry per layer): remapped to the new positions.
INDEX_LISTS = frozenset({"mlp_only_layers"})
MLP_NAMES = ("mlp", "feed_forward", "ffn")
SIMPLE = (bool, int, float, str, type(None))


def _causal_attention(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if getattr(child, "is_causal", None) is True:
            return name
    return None


def _mlp(layer: nn.Module) -> str | None:
    for name, child in layer.named_children():
        if name in MLP_NAMES or type(child).__name__.endswith("MLP"):
            return name
    return None


def _is_decoder_layer(layer: nn.Module) -> bool:
    return _causal_attention(layer) is not None and _mlp(layer) is not None


def find_layers_attr(backbone: nn.Module) -> str | None:
    """The name of ``backbone``'s child ``ModuleList`` of decoder layers, or ``None`` when it has none (or no
    final norm)."""
    found = None
    for name, child in backbone.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and all(_is_decoder_layer(layer) for layer in child):
            found = name
            break
    has_norm = any("norm" in type(child).__name__.lower() for _, child in backbone.named_children())
    return found if has_norm else None


def _branch_norms(layer: nn.Module) -> dict[str, tuple[list[str], list[str]]]:
    """``{"attention": (pre-norms, post-norms), "mlp": (...)}``: the norms of ``layer`` that only feed (pre) or
    only follow (post) each residual branch, by the names transformers' decoder layers use.

    Raises ``ValueError`` when ``layer`` has a norm these rules do not place: its role is unknown, and removing a
    branch while keeping it could silently change the function.
    """
    names = [name for name, _ in layer.named_children()]

    def present(*candidates: str) -> list[str]:
        return [c for c in candidates if c in names]

    if "pre_feedforward_layernorm" in names:  # Gemma 2/3: a norm before and after each branch
        roles = {"attention": (present("input_layernorm"), present("post_attention_layernorm")),
                 "mlp": (present("pre_feedforward_layernorm"), present("post_feedforward_layernorm"))}
    elif "input_layernorm" not in names and "post_feedforward_layernorm" in names:  # OLMo2: norms after branches
        roles = {"attention": ([], present("post_attention_layernorm")),
                 "mlp": ([], present("post_feedforward_layernorm"))}
    else:  # pre-norm layers (Llama, Qwen, Mistral, Phi3, GPT-NeoX, ...): post_attention_layernorm feeds the MLP
        roles = {"attention": (present("input_layernorm"), []),
                 "mlp": (present("post_attention_layernorm"), present("post_feedforward_layernorm"))}
    placed = {n for pre, post in roles.values() for n in (*pre, *post)}
    unplaced = [n for n, child in layer.named_children()
                if n not in placed and ("norm" in n.lower() or "norm" in type(child).__name__.lower())]
    if unplaced:
        raise ValueError(f"{type(layer).__name__} has norms {unplaced} whose branch (attention or MLP) hf_collapse "
                         "cannot tell: sub-layer removal is not supported for this family; remove whole blocks")
    return roles


def _settings(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and isinstance(v, SIMPLE)}


class DecoderAdapter(ArchitectureAdapter):
    family = "decoder"
    legacy_families = ("llama",)  # the name of this family in hf_collapse 0.1 records (Llama, Qwen2, Mistral)
    description = ("decoder-only causal LMs recognised by structure (layers with causal self-attention and an "
                   "MLP, a final norm): Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, OLMo2, GPT-NeoX, SmolLM3, Granite")
    depth_key = "num_hidden_layers"

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if config is None or isinstance(config, dict) or getattr(config, "is_encoder_decoder", False):
            return False
        return isinstance(config_get(model, self.depth_key), int) and find_layers_attr(model) is not None

    def layers_attr(self, backbone: nn.Module) -> str:
        attr = find_layers_attr(backbone)
        if attr is None:
            raise ValueError(f"{type(backbone).__name__} has no list of decoder layers")
        return attr

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return getattr(backbone, self.layers_attr(backbone))

    def blocks(self, backbone: nn.Module) -> list[Block]:
        attr = self.layers_attr(backbone)
        return [Block(name=f"{attr}.{i}", path=f"{attr}.{i}", stage=0, index=i, params=count_parameters(layer))
                for i, layer in enumerate(getattr(backbone, attr))]

    def remove(self, backbone: nn.Module, blocks: list[Block], base_values: dict[str, Any]) -> None:
        attr = self.layers_attr(backbone)
        total = len(getattr(backbone, attr))
        dropped = {block.index for block in blocks}
        keep = [i for i in range(total) if i not in dropped]
        replace_children(backbone, attr, keep)
        renumber_layer_idx(getattr(backbone, attr))

        updates: dict[str, Any] = {self.depth_key: len(keep)}
        for key, values in vars(backbone.config).items():
            if key.startswith("_") or key in NOT_PER_LAYER or not isinstance(values, (list, tuple)):
                continue
            if key in INDEX_LISTS:
                updates[key] = type(values)(keep.index(i) for i in values if i in keep)
                continue
            if len(values) == total:
                updates[key] = type(values)(values[i] for i in keep)
        window_layers = config_get(backbone, "max_window_layers")
        if isinstance(window_layers, int):  # Qwen: layers below this index use full attention
            updates["max_window_layers"] = sum(1 for i in keep if i < window_layers)
        for key in updates:
            old = config_get(backbone, key)
            base_values.setdefault(key, list(old) if isinstance(old, tuple) else copy.deepcopy(old))
        config_set(backbone, **updates)

    sublayer_kinds = SUBLAYER_KINDS

    def _branch(self, layer: nn.Module, kind: str) -> str:
        return _causal_attention(layer) if kind == "attention" else _mlp(layer)

    def sublayers(self, backbone: nn.Module, kind: str) -> list[Block]:
        """One unit per layer whose ``kind`` branch is still there: the branch module with the norms that only
        feed / follow it. Its input is the residual stream entering the branch, its output that stream plus the
        branch's output (``output_adds_input``). A layer whose other branch was removed already lists its last
        branch as not removable: removing it would empty the layer, which is a block removal."""
        attr = self.layers_attr(backbone)
        other = "mlp" if kind == "attention" else "attention"
        units = []
        for i, layer in enumerate(getattr(backbone, attr)):
            branch = self._branch(layer, kind)
            module = getattr(layer, branch)
            if is_removed_sublayer(module):
                continue
            pre, post = _branch_norms(layer)[kind]
            prefix = f"{attr}.{i}"
            name = f"{prefix}.{branch}"
            emptied = is_removed_sublayer(getattr(layer, self._branch(layer, other)))
            units.append(Block(
                name=name, path=name, stage=0, index=i, kind=kind, output_adds_input=True,
                params=count_parameters(module) + sum(count_parameters(getattr(layer, n)) for n in (*pre, *post)),
                input_path=f"{prefix}.{pre[0]}" if pre else name,
                output_path=f"{prefix}.{post[-1]}" if post else name,
                extra_paths=tuple(f"{prefix}.{n}" for n in (*pre, *post)),
                removable=not emptied,
                reason=f"the {other} of {prefix} was removed already: remove the whole block {prefix!r} instead"
                if emptied else ""))
        return units

    def remove_sublayers(self, backbone: nn.Module, units: list[Block]) -> None:
        layers = self.layers(backbone)
        for unit in units:
            layer = layers[unit.index]
            pre, post = _branch_norms(layer)[unit.kind]
            branch = self._branch(layer, unit.kind)
            setattr(layer, branch, ZeroAttention(layer_idx=unit.index) if unit.kind == "attention" else ZeroMLP())
            for norm in (*pre, *post):  # a norm that only feeds / follows the branch: x + 0 needs none of it
                setattr(layer, norm, nn.Identity())

    def config_expresses(self, backbone, base_values, history):
        """Build the architecture from the updated config on ``meta`` and compare every per-layer setting."""
        try:
            with torch.device("meta"):
                fresh = type(backbone)(copy.deepcopy(backbone.config))
        except Exception as error:  # an architecture that cannot be built on meta: AutoCollapsedModel only
            logger.warning("could not rebuild %s from its updated config (%s): plain from_pretrained is not "
                           "known to be exact; use hf_collapse.AutoCollapsedModel", type(backbone).__name__, error)
            return False
        live, rebuilt = self.layers(backbone), self.layers(fresh)
        if len(live) != len(rebuilt):
            return False
        # Look through adapter wrappers (peft's LoRA layers keep the original under ``base_layer``).
        by_name = {name.replace(".base_layer", ""): module for name, module in live.named_modules()
                   if not type(module).__module__.startswith("peft")}
        for name, other in rebuilt.named_modules():
            module = by_name.get(name)
            if type(module) is not type(other) or _settings(module) != _settings(other):
                logger.info("plain reload would rebuild layers.%s differently: %s != %s", name,
                            _settings(module) if module is not None else None, _settings(other))
                return False
        return True

    def activation_sites(self, backbone):
        sites = []
        for block in self.blocks(backbone):
            layer = backbone.get_submodule(block.name)
            mlp_name = _mlp(layer)
            mlp = getattr(layer, mlp_name)
            children = dict(mlp.named_children())
            activation = next((n for n, c in children.items() if not isinstance(c, nn.Linear)), None)
            linears = [n for n, c in children.items() if isinstance(c, nn.Linear)]
            if activation is None or len(linears) < 2:
                continue
            if "gate_proj" in children and "down_proj" in children:  # SwiGLU / GeGLU: act(gate(x)) * up(x)
                producer, consumer, gated = "gate_proj", "down_proj", True
            elif "gate_up_proj" in children:  # Phi3: gate and up fused in one linear
                producer, consumer, gated = "gate_up_proj", linears[-1], True
            else:  # act(fc_in(x)) -> fc_out
                producer, consumer, gated = linears[0], linears[-1], False
            sites.append(mlp_site(block.name, f"{mlp_name}.{activation}", f"{mlp_name}.{producer}",
                                  f"{mlp_name}.{consumer}", gated=gated))
        return sites

    def example_inputs(self, model, batch_size=1, seq_len=128):
        limit = config_get(model, "max_position_embeddings")
        return text_inputs(model, batch_size, min(seq_len, limit) if isinstance(limit, int) else seq_len)


# Registered before every other family (imported first in __init__): the registry tries the most recently
# registered adapter first, so a family with its own adapter (GPT-2) keeps it and this one is the fallback.
register_architecture(DecoderAdapter())

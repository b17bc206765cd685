"""Decoder-only causal LMs of any family, recognised by structure rather than by a list of model types.

A backbone is a decoder when one of its children is a ``ModuleList`` of layers that each hold a causal
self-attention module (``is_causal`` set, as transformers' attention classes do) and an MLP, next to a final
norm. Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, OLMo2, GPT-NeoX, SmolLM3, Granite and their relatives all fit.

Removing layers updates everything that is per layer: the ``ModuleList``, ``num_hidden_layers``, the ``layer_idx``
of every module (KV-cache slots), and every config field that lists or counts layers:

* lists with one entry per layer (``layer_types``, SmolLM3's and Llama4's ``no_rope_layers``, ...) keep the entries
  of the kept layers;
* lists of layer *indices* (Qwen-MoE's ``mlp_only_layers``, Llama4's ``moe_layers``, and any other list of layer
  indices whose name says so) are renumbered to the kept layers' new positions;
* thresholds that mean "the layers below index k" (DeepSeek's ``first_k_dense_replace``, LFM2-MoE's
  ``num_dense_layers``, Qwen's ``max_window_layers``) become the number of kept layers below k;
* a step pattern that the config can also spell as an explicit list (Qwen-MoE's ``decoder_sparse_step`` with
  ``mlp_only_layers``) is rewritten as that list, so that it survives a removal that shifts later layers.

Whether a plain ``from_pretrained`` of the updated config rebuilds the same model is checked, not assumed: a copy of
the architecture is built from the updated config on the ``meta`` device and its per-layer modules and settings
(MoE or dense, sliding window, rope on/off, scaling, ...) are compared with the collapsed model's. A field this
module does not know that changes a layer's structure is caught there: the record then says that only
``AutoCollapsedModel`` reloads the model exactly.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .base import (
    ArchitectureAdapter,
    Block,
    config_get,
    config_set,
    count_parameters,
    register_architecture,
    replace_children,
)
from .common import mlp_site, renumber_layer_idx, text_inputs
from .sublayers import ResidualSublayers, causal_attention_name, mlp_name

logger = logging.getLogger(__name__)

# Top-level config lists that never hold one entry per layer, even when their length happens to match.
NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "bad_words_ids",
        "suppress_tokens",
        "begin_suppress_tokens",
        "forced_decoder_ids",
        "id2label",
        "label2id",
        "task_specific_params",
    }
)
# Top-level config lists of layer *indices* (not one entry per layer), even when their length happens to equal the
# depth: remapped to the new positions. Other int lists named like "..._layers" / "..._layer_ids" whose values are
# valid indices are treated the same way.
INDEX_LISTS = frozenset({"mlp_only_layers", "moe_layers"})
# Config ints meaning "the layers with an index below this one" (dense prefix, full-attention prefix).
BELOW_INDEX = frozenset({"first_k_dense_replace", "num_dense_layers", "max_window_layers"})
SIMPLE = (bool, int, float, str, type(None))


def _is_index_list(key: str, values: Any, total: int) -> bool:
    if key in INDEX_LISTS:
        return True
    return (
        key.endswith(("_layers", "_layer_ids", "_layer_indices"))
        and isinstance(values, (list, tuple))
        and len(values) != total
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < total for v in values)
    )


def layer_field_updates(config: Any, keep: list[int], total: int) -> dict[str, Any]:
    """The config fields that list or count layers, as they must read once only the layers ``keep`` (original
    indices, in order) of ``total`` remain (see the module docstring)."""
    updates: dict[str, Any] = {}
    for key, values in vars(config).items():
        if key.startswith("_") or key in NOT_PER_LAYER or not isinstance(values, (list, tuple)):
            continue
        if _is_index_list(key, values, total):
            updates[key] = type(values)(keep.index(i) for i in values if i in keep)
        elif len(values) == total:
            updates[key] = type(values)(values[i] for i in keep)
    for key in BELOW_INDEX:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            updates[key] = sum(1 for i in keep if i < value)
    step = getattr(config, "decoder_sparse_step", None)
    dense = getattr(config, "mlp_only_layers", None)
    if isinstance(step, int) and step > 1 and isinstance(dense, (list, tuple)):
        # Qwen-MoE: layer i is sparse iff i is not in mlp_only_layers and (i + 1) % step == 0. The kept layers'
        # pattern, spelt as an explicit list with step 1, survives any removal.
        updates["decoder_sparse_step"] = 1
        updates["mlp_only_layers"] = [new for new, old in enumerate(keep) if old in dense or (old + 1) % step != 0]
    return updates


def _is_decoder_layer(layer: nn.Module) -> bool:
    return causal_attention_name(layer) is not None and mlp_name(layer) is not None


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


def _settings(module: nn.Module) -> dict[str, Any]:
    return {
        k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and isinstance(v, SIMPLE)
    }


class DecoderAdapter(ResidualSublayers, ArchitectureAdapter):
    family = "decoder"
    legacy_families = ("llama",)  # the name of this family in hf_collapse 0.1 records (Llama, Qwen2, Mistral)
    description = (
        "decoder-only causal LMs recognised by structure (layers with causal self-attention and an "
        "MLP, a final norm): Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, OLMo2, GPT-NeoX, SmolLM3, Granite"
    )
    depth_key = "num_hidden_layers"

    def backbone(self, model: nn.Module) -> nn.Module:
        """The module holding the decoder layers: ``model.base_model``, or the child that holds them where
        ``base_model`` does not lead there (Llama4ForCausalLM's ``base_model_prefix`` names a module it lacks)."""
        base = super().backbone(model)
        if find_layers_attr(base) is None:
            for child in base.children():
                if (
                    isinstance(getattr(child, "config", None), type(getattr(base, "config", None)))
                    and find_layers_attr(child) is not None
                ):
                    return child
        return base

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

    def layers_prefix(self, backbone: nn.Module) -> str:
        return self.layers_attr(backbone)

    def blocks(self, backbone: nn.Module) -> list[Block]:
        attr = self.layers_attr(backbone)
        return [
            Block(name=f"{attr}.{i}", path=f"{attr}.{i}", stage=0, index=i, params=count_parameters(layer))
            for i, layer in enumerate(getattr(backbone, attr))
        ]

    def remove(self, backbone: nn.Module, blocks: list[Block], base_values: dict[str, Any]) -> None:
        attr = self.layers_attr(backbone)
        total = len(getattr(backbone, attr))
        dropped = {block.index for block in blocks}
        keep = [i for i in range(total) if i not in dropped]
        replace_children(backbone, attr, keep)
        renumber_layer_idx(getattr(backbone, attr))

        updates: dict[str, Any] = {self.depth_key: len(keep), **layer_field_updates(backbone.config, keep, total)}
        for key in updates:
            old = config_get(backbone, key)
            base_values.setdefault(key, list(old) if isinstance(old, tuple) else copy.deepcopy(old))
        config_set(backbone, **updates)

    def config_expresses(self, backbone, base_values, history):
        """Build the architecture from the updated config on ``meta`` and compare every per-layer setting."""
        try:
            with torch.device("meta"):
                fresh = type(backbone)(copy.deepcopy(backbone.config))
        except Exception as error:  # an architecture that cannot be built on meta: AutoCollapsedModel only
            logger.warning(
                "could not rebuild %s from its updated config (%s): plain from_pretrained is not "
                "known to be exact; use hf_collapse.AutoCollapsedModel",
                type(backbone).__name__,
                error,
            )
            return False
        live, rebuilt = self.layers(backbone), self.layers(fresh)
        if len(live) != len(rebuilt):
            return False
        # Look through adapter wrappers (peft's LoRA layers keep the original under ``base_layer``).
        by_name = {
            name.replace(".base_layer", ""): module
            for name, module in live.named_modules()
            if not type(module).__module__.startswith("peft")
        }
        for name, other in rebuilt.named_modules():
            module = by_name.get(name)
            if type(module) is not type(other) or _settings(module) != _settings(other):
                logger.info(
                    "plain reload would rebuild layers.%s differently: %s != %s",
                    name,
                    _settings(module) if module is not None else None,
                    _settings(other),
                )
                return False
        return True

    def activation_sites(self, backbone):
        sites = []
        for block in self.blocks(backbone):
            layer = backbone.get_submodule(block.name)
            mlp_child = mlp_name(layer)
            mlp = getattr(layer, mlp_child)
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
            sites.append(
                mlp_site(
                    block.name,
                    f"{mlp_child}.{activation}",
                    f"{mlp_child}.{producer}",
                    f"{mlp_child}.{consumer}",
                    gated=gated,
                )
            )
        return sites

    def example_inputs(self, model, batch_size=1, seq_len=128):
        limit = config_get(model, "max_position_embeddings")
        return text_inputs(model, batch_size, min(seq_len, limit) if isinstance(limit, int) else seq_len)


# Registered before every other family (imported first in __init__): the registry tries the most recently
# registered adapter first, so a family with its own adapter (GPT-2) keeps it and this one is the fallback.
register_architecture(DecoderAdapter())

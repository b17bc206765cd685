"""Building blocks shared by the family adapters: a flat list of layers, staged layers, example inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ActivationSite, ArchitectureAdapter, Block, config_get, config_set, count_parameters, replace_children


def split_path(path: str) -> tuple[str, str]:
    parent, _, attr = path.rpartition(".")
    return parent, attr


def renumber_layer_idx(layers: nn.ModuleList) -> None:
    """Keep every ``layer_idx`` attribute (attention modules, KV-cache slots) equal to the layer's position."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def mlp_site(block: str, activation: str, producer: str, consumer: str, **kind) -> ActivationSite:
    """A site whose paths are given relative to ``block``."""
    return ActivationSite(
        name=f"{block}.{activation}",
        block=block,
        activation=f"{block}.{activation}",
        producer=f"{block}.{producer}",
        consumer=f"{block}.{consumer}",
        **kind,
    )


def conv_layer_site(block: str, conv: str, consumer: str) -> ActivationSite:
    """A ``convolution -> normalization -> activation`` layer (ResNet, MobileNetV2) feeding ``consumer``'s
    convolution; paths relative to the backbone."""
    return ActivationSite(
        name=f"{conv}.activation",
        block=block,
        activation=f"{conv}.activation",
        producer=f"{conv}.convolution",
        norm=f"{conv}.normalization",
        consumer=f"{consumer}.convolution",
        kind="conv",
    )


def text_inputs(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, Any]:
    vocab = config_get(model, "vocab_size", 1000)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def image_inputs(model: nn.Module, batch_size: int, default_size: int = 224) -> dict[str, Any]:
    size = config_get(model, "image_size", default_size)
    if isinstance(size, (tuple, list)):
        size = size[0]
    channels = config_get(model, "num_channels", 3)
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch_size, channels, size, size, generator=generator)}


class LayerListAdapter(ArchitectureAdapter):
    """A family whose blocks form one ``nn.ModuleList`` and whose depth is one config field.

    Attributes:
        layers_path: path of the ModuleList inside the backbone (``"encoder.layer"``).
        depth_key: config field holding the number of layers (``"num_hidden_layers"``).
        per_layer_keys: config fields holding one entry per layer (``"layer_types"``), kept in step.
    """

    layers_path: str = ""
    depth_key: str | None = "num_hidden_layers"  # None: the config does not describe the depth
    per_layer_keys: tuple[str, ...] = ()

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.get_submodule(self.layers_path)

    def blocks(self, backbone: nn.Module) -> list[Block]:
        return [
            Block(
                name=f"{self.layers_path}.{i}",
                path=f"{self.layers_path}.{i}",
                stage=0,
                index=i,
                params=count_parameters(layer),
            )
            for i, layer in enumerate(self.layers(backbone))
        ]

    def remove(self, backbone: nn.Module, blocks: list[Block], base_values: dict[str, Any]) -> None:
        dropped = {block.index for block in blocks}
        keep = [i for i in range(len(self.layers(backbone))) if i not in dropped]
        parent, attr = split_path(self.layers_path)
        replace_children(backbone.get_submodule(parent), attr, keep)
        renumber_layer_idx(self.layers(backbone))
        if self.depth_key is None:
            return
        updates: dict[str, Any] = {self.depth_key: len(keep)}
        for key in self.per_layer_keys:
            values = config_get(backbone, key)
            if isinstance(values, (list, tuple)) and len(values) == len(keep) + len(dropped):
                updates[key] = [values[i] for i in keep]
        for key in updates:
            base_values.setdefault(key, config_get(backbone, key))
        config_set(backbone, **updates)


class StagedLayersAdapter(ArchitectureAdapter):
    """A family whose blocks sit in stages (``stages_path[s].<blocks_attr>[i]``) with a ``depths`` config list."""

    stages_path: str = ""
    blocks_attr: str = ""
    depths_key: str = "depths"

    def stages(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.get_submodule(self.stages_path)

    def stage_blocks(self, backbone: nn.Module, stage: int) -> nn.Module:
        return getattr(self.stages(backbone)[stage], self.blocks_attr)

    def removable(self, block: nn.Module) -> tuple[bool, str]:
        return True, ""

    def blocks(self, backbone: nn.Module) -> list[Block]:
        found = []
        for s in range(len(self.stages(backbone))):
            for i, module in enumerate(self.stage_blocks(backbone, s)):
                path = f"{self.stages_path}.{s}.{self.blocks_attr}.{i}"
                ok, reason = self.removable(module)
                found.append(
                    Block(
                        name=path,
                        path=path,
                        stage=s,
                        index=i,
                        params=count_parameters(module),
                        removable=ok,
                        reason=reason,
                    )
                )
        return found

    def remove(self, backbone: nn.Module, blocks: list[Block], base_values: dict[str, Any]) -> None:
        depths = list(config_get(backbone, self.depths_key))
        base_values.setdefault(self.depths_key, list(depths))
        for s, stage in enumerate(self.stages(backbone)):
            dropped = {b.index for b in blocks if b.stage == s}
            if dropped:
                keep = [i for i in range(len(getattr(stage, self.blocks_attr))) if i not in dropped]
                replace_children(stage, self.blocks_attr, keep)
                depths[s] = len(keep)
        config_set(backbone, **{self.depths_key: depths})


def original_positions(depths: list[int], history: list[list[str]], name_of) -> list[list[int]]:
    """For each stage, the original index of every remaining block after the recorded removals.

    ``name_of(stage, index)`` gives a block's name; ``history`` the names removed by each call, in order.
    """
    positions = [list(range(d)) for d in depths]
    for removed in history:
        current = {name_of(s, i): (s, i) for s, stage in enumerate(positions) for i in range(len(stage))}
        dropped = {current[name] for name in removed if name in current}
        positions = [
            [orig for i, orig in enumerate(stage) if (s, i) not in dropped] for s, stage in enumerate(positions)
        ]
    return positions


def feed_forward_sites(backbone: nn.Module, blocks: list[Block]) -> list[ActivationSite]:
    """Activation sites of the diffusers ``FeedForward`` modules inside ``blocks``.

    ``net[0]`` holds the projection and the activation (GELU, GEGLU, ...), ``net[2]`` is the output linear.
    A site outside every block (a UNet mid-block, an unpaired up-block attention) has ``block=""``.
    A gated activation (GEGLU, SwiGLU) projects to twice the consumer's input width.
    """
    sites = []
    owner = {path: b.name for b in blocks for path in (b.path, *b.extra_paths)}
    prefixes = sorted(owner, key=len, reverse=True)
    for name, module in backbone.named_modules():
        if type(module).__name__ != "FeedForward":
            continue
        projection = getattr(module.net[0], "proj", None)
        consumer = module.net[2]
        block = owner.get(next((p for p in prefixes if name.startswith(p + ".")), ""), "")
        sites.append(
            ActivationSite(
                name=f"{name}.net.0",
                block=block,
                activation=f"{name}.net.0",
                producer=f"{name}.net.0.proj",
                consumer=f"{name}.net.2",
                gated=projection is None or projection.out_features != consumer.in_features,
            )
        )
    return sites


def diffusion_inputs(model: nn.Module, batch_size: int, sample_key: str) -> dict[str, Any]:
    """A noisy sample, a timestep, and the conditioning the model's config asks for."""
    generator = torch.Generator().manual_seed(0)
    size = config_get(model, "sample_size", 32)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    inputs: dict[str, Any] = {
        sample_key: torch.randn(batch_size, config_get(model, "in_channels"), height, width, generator=generator),
        "timestep": torch.full((batch_size,), 10, dtype=torch.long),
    }
    cross_dim = config_get(model, "cross_attention_dim")
    if cross_dim:
        cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim
        inputs["encoder_hidden_states"] = torch.randn(batch_size, 8, cross_dim, generator=generator)
    if config_get(model, "num_embeds_ada_norm") and config_get(model, "norm_type") == "ada_norm_zero":
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long)
    return inputs

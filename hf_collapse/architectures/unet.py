"""Diffusers ``UNet2DConditionModel``.

A block is a down-block resnet (with its cross-attention transformer, if the down block has one) together
with the up-block resnet (and attention) that consumes its skip connection: down resnet ``j`` of down block
``b`` feeds up resnet ``L_b - 1 - j`` of the matching up block, where ``L_b`` is that down block's number of
layers. Removing both keeps every other skip paired with the same consumer, and ``layers_per_block`` (per
down block) expresses the result.

Not removable: a resnet that changes the channel count, the last resnet of a down block, and a pair whose up
resnet is the first of its block when the next one reads a different number of channels.
"""

from __future__ import annotations

from typing import Any

from .base import (
    ArchitectureAdapter,
    Block,
    config_get,
    config_set,
    count_parameters,
    register_architecture,
    replace_children,
)
from .common import diffusion_inputs, feed_forward_sites


class UNet2DConditionAdapter(ArchitectureAdapter):
    family = "unet_2d_condition"
    description = "diffusers UNet2DConditionModel (down resnet/attention + the up resnet consuming its skip)"
    class_names = ("UNet2DConditionModel",)

    def _pair(self, backbone, b: int, j: int) -> tuple[list[str], str]:
        """Paths removed with down resnet ``j`` of down block ``b``, and why the pair is not removable."""
        down = backbone.down_blocks[b]
        up_index = len(backbone.down_blocks) - 1 - b
        up = backbone.up_blocks[up_index]
        depth = len(down.resnets)
        i = depth - 1 - j
        paths = [f"down_blocks.{b}.resnets.{j}"]
        if getattr(down, "attentions", None) is not None and len(down.attentions) == depth:
            paths.append(f"down_blocks.{b}.attentions.{j}")
        paths.append(f"up_blocks.{up_index}.resnets.{i}")
        if getattr(up, "attentions", None) is not None and len(up.attentions) == len(up.resnets):
            paths.append(f"up_blocks.{up_index}.attentions.{i}")
        resnet = down.resnets[j]
        if resnet.in_channels != resnet.out_channels:
            return paths, "its resnet changes the channel count"
        if depth < 2:
            return paths, "it is the last resnet of its down block"
        if i == 0 and up.resnets[0].conv1.in_channels != up.resnets[1].conv1.in_channels:
            return paths, "the up resnet consuming its skip reads a different number of channels than the next one"
        return paths, ""

    def blocks(self, backbone):
        found = []
        for b, down in enumerate(backbone.down_blocks):
            for j in range(len(down.resnets)):
                paths, reason = self._pair(backbone, b, j)
                params = sum(count_parameters(backbone.get_submodule(p)) for p in paths)
                has_attention = len(paths) > 1 and ".attentions." in paths[1]
                found.append(
                    Block(
                        name=paths[0],
                        path=paths[0],
                        stage=b,
                        index=j,
                        params=params,
                        removable=not reason,
                        reason=reason,
                        input_path=paths[0],
                        output_path=paths[1] if has_attention else paths[0],
                        extra_paths=tuple(paths[1:]),
                    )
                )
        return found

    def remove(self, backbone, blocks: list[Block], base_values: dict[str, Any]) -> None:
        depths = [len(down.resnets) for down in backbone.down_blocks]
        base_values.setdefault("layers_per_block", config_get(backbone, "layers_per_block"))
        for b, down in enumerate(backbone.down_blocks):
            dropped = {blk.index for blk in blocks if blk.stage == b}
            if not dropped:
                continue
            up = backbone.up_blocks[len(backbone.down_blocks) - 1 - b]
            down_keep = [j for j in range(depths[b]) if j not in dropped]
            up_keep = [i for i in range(len(up.resnets)) if depths[b] - 1 - i not in dropped]
            for module, keep in ((down, down_keep), (up, up_keep)):
                has_attention = getattr(module, "attentions", None) is not None and len(module.attentions) == len(
                    module.resnets
                )
                replace_children(module, "resnets", keep)
                if has_attention:
                    replace_children(module, "attentions", keep)
            depths[b] = len(down_keep)
        config_set(backbone, layers_per_block=depths)

    def config_expresses(self, backbone, base_values, history):
        # Per-layer nested transformer depths would have to be edited too; leave those to the replay.
        per_block = config_get(backbone, "transformer_layers_per_block")
        nested = isinstance(per_block, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in per_block)
        return not nested and config_get(backbone, "reverse_transformer_layers_per_block") is None

    def activation_sites(self, backbone):
        return feed_forward_sites(backbone, self.blocks(backbone))

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return diffusion_inputs(model, batch_size, "sample")


register_architecture(UNet2DConditionAdapter())

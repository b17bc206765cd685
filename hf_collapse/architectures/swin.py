"""Swin Transformer: ``encoder.layers[s].blocks[i]``, depth per stage in ``depths``.

Swin derives each block's window shift from its index (``0 if i % 2 == 0 else window_size // 2``). Removing
blocks keeps the function of the others only if the remaining blocks keep that alternation; otherwise the
config cannot express the change and ``AutoCollapsedModel`` replays the removal on the original structure.
"""

from __future__ import annotations

from .base import register_architecture
from .common import StagedLayersAdapter, image_inputs, mlp_site, original_positions


class SwinAdapter(StagedLayersAdapter):
    family = "swin"
    description = "Swin Transformer (encoder.layers[s].blocks[i]; patch merging is not a block)"
    model_types = ("swin",)
    stages_path = "encoder.layers"
    blocks_attr = "blocks"

    def config_expresses(self, backbone, base_values, history):
        depths = base_values.get(self.depths_key, backbone.config.depths)
        name_of = lambda s, i: f"{self.stages_path}.{s}.{self.blocks_attr}.{i}"  # noqa: E731
        positions = original_positions(list(depths), history, name_of)
        return all(orig % 2 == i % 2 for stage in positions for i, orig in enumerate(stage))

    def activation_sites(self, backbone):
        return [mlp_site(b.name, "mlp.activation_fn", "mlp.fc1", "mlp.fc2") for b in self.blocks(backbone)]

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return image_inputs(model, batch_size)


register_architecture(SwinAdapter())

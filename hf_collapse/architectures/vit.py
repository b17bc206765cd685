"""Vision Transformer (ViT): ``encoder.layer[i]``."""

from __future__ import annotations

from .base import register_architecture
from .common import LayerListAdapter, dense_site, image_inputs


class ViTAdapter(LayerListAdapter):
    family = "vit"
    description = "Vision Transformer (encoder.layer[i])"
    model_types = ("vit",)
    layers_path = "encoder.layer"

    def activation_sites(self, backbone):
        return [
            dense_site(b.name, f"{b.name}.intermediate", f"{b.name}.output") for b in self.blocks(backbone)
        ]

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return image_inputs(model, batch_size)


register_architecture(ViTAdapter())

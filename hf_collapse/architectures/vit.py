"""Vision Transformer (ViT): ``layers[i]``."""

from __future__ import annotations

from .base import register_architecture
from .common import LayerListAdapter, image_inputs, mlp_site


class ViTAdapter(LayerListAdapter):
    family = "vit"
    description = "Vision Transformer (layers[i])"
    model_types = ("vit",)
    layers_path = "layers"

    def activation_sites(self, backbone):
        return [mlp_site(b.name, "mlp.activation_fn", "mlp.fc1", "mlp.fc2") for b in self.blocks(backbone)]

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return image_inputs(model, batch_size)


register_architecture(ViTAdapter())

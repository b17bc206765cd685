"""Diffusers DiT-style transformers (``DiTTransformer2DModel``, ``Transformer2DModel``): ``transformer_blocks[i]``."""

from __future__ import annotations

from .base import register_architecture
from .common import LayerListAdapter, diffusion_inputs, feed_forward_sites


class DiTAdapter(LayerListAdapter):
    family = "dit"
    description = "diffusers DiTTransformer2DModel / Transformer2DModel (transformer_blocks[i])"
    class_names = ("DiTTransformer2DModel", "Transformer2DModel")
    layers_path = "transformer_blocks"
    depth_key = "num_layers"

    def activation_sites(self, backbone):
        return feed_forward_sites(backbone, self.blocks(backbone))

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return diffusion_inputs(model, batch_size, "hidden_states")


register_architecture(DiTAdapter())

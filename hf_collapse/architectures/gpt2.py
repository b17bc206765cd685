"""GPT-2 decoders: ``h[i]``, depth in ``n_layer``; attention (``ln_1`` + ``attn``) and MLP (``ln_2`` + ``mlp``)
sub-layers as units too."""

from __future__ import annotations

from .base import register_architecture
from .common import LayerListAdapter, mlp_site, text_inputs
from .sublayers import ResidualSublayers


class GPT2Adapter(ResidualSublayers, LayerListAdapter):
    family = "gpt2"
    description = "GPT-2 decoders (h[i])"
    model_types = ("gpt2",)
    layers_path = "h"
    depth_key = "n_layer"

    def config_expresses(self, backbone, base_values, history):
        # With scale_attn_by_inverse_layer_idx the attention scale is fixed at construction from the layer
        # index: a plain reload would rescale the layers that moved down.
        return not backbone.config.scale_attn_by_inverse_layer_idx

    def activation_sites(self, backbone):
        return [mlp_site(b.name, "mlp.act", "mlp.c_fc", "mlp.c_proj", kind="conv1d") for b in self.blocks(backbone)]

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return text_inputs(model, batch_size, min(seq_len, model.config.n_positions))


register_architecture(GPT2Adapter())

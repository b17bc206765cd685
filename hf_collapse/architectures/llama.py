"""Llama-style decoders (Llama, Qwen2, Mistral): ``layers[i]``, with ``layer_types`` kept in step."""

from __future__ import annotations

from .base import register_architecture
from .common import LayerListAdapter, mlp_site, text_inputs


class LlamaAdapter(LayerListAdapter):
    family = "llama"
    description = "Llama-style decoders: Llama, Qwen2, Mistral (layers[i])"
    model_types = ("llama", "qwen2", "mistral")
    layers_path = "layers"
    per_layer_keys = ("layer_types",)

    def activation_sites(self, backbone):
        # SwiGLU: act(gate_proj(x)) * up_proj(x) is gated, so TLC cannot linearize it into one map.
        return [
            mlp_site(b.name, "mlp.act_fn", "mlp.gate_proj", "mlp.down_proj", gated=True)
            for b in self.blocks(backbone)
        ]

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return text_inputs(model, batch_size, seq_len)


register_architecture(LlamaAdapter())

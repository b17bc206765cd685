"""MobileNetV2 (transformers): ``layer[i]`` inverted residual blocks.

Only blocks with a residual connection (stride 1, same channels) are removable. The config describes depth
through ``depth_multiplier`` only, so removals are never expressible by the config: the saved record lets
``AutoCollapsedModel`` replay them.
"""

from __future__ import annotations

from .base import Block, count_parameters, register_architecture
from .common import LayerListAdapter, conv_layer_site, image_inputs


class MobileNetV2Adapter(LayerListAdapter):
    family = "mobilenet_v2"
    description = "MobileNetV2 (layer[i] inverted residual blocks)"
    model_types = ("mobilenet_v2",)
    layers_path = "layer"
    depth_key = None

    def blocks(self, backbone):
        found = []
        for i, layer in enumerate(self.layers(backbone)):
            reason = "" if layer.use_residual else "it changes the tensor shape (stride or channel change, no residual)"
            found.append(
                Block(
                    name=f"layer.{i}",
                    path=f"layer.{i}",
                    stage=0,
                    index=i,
                    params=count_parameters(layer),
                    removable=layer.use_residual,
                    reason=reason,
                )
            )
        return found

    def config_expresses(self, backbone, base_values, history):
        return False

    def activation_sites(self, backbone):
        sites = []
        for b in self.blocks(backbone):
            sites += [
                conv_layer_site(b.name, f"{b.path}.{conv}", f"{b.path}.{consumer}")
                for conv, consumer in (("expand_1x1", "conv_3x3"), ("conv_3x3", "reduce_1x1"))
            ]
        return sites

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return image_inputs(model, batch_size)


register_architecture(MobileNetV2Adapter())

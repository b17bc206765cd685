"""ResNet (transformers): ``encoder.stages[s].layers[i]``, depth per stage in ``depths``.

A layer with a projection shortcut (first layer of a stage: stride or channel change) changes the tensor
shape and is not removable.
"""

from __future__ import annotations

from torch import nn

from .base import register_architecture
from .common import StagedLayersAdapter, conv_layer_site, image_inputs


class ResNetAdapter(StagedLayersAdapter):
    family = "resnet"
    description = "ResNet, basic and bottleneck (encoder.stages[s].layers[i])"
    model_types = ("resnet",)
    stages_path = "encoder.stages"
    blocks_attr = "layers"

    def removable(self, block):
        if isinstance(block.shortcut, nn.Identity):
            return True, ""
        return False, "it changes the tensor shape (strided or channel-changing layer with a projection shortcut)"

    def config_expresses(self, backbone, base_values, history):
        # ResNetStage always builds its first layer: an emptied stage cannot be expressed by `depths`.
        return all(d >= 1 for d in backbone.config.depths)

    def activation_sites(self, backbone):
        sites = []
        for b in self.blocks(backbone):
            convs = backbone.get_submodule(f"{b.path}.layer")
            sites += [
                conv_layer_site(b.name, f"{b.path}.layer.{k}", f"{b.path}.layer.{k + 1}") for k in range(len(convs) - 1)
            ]
        return sites

    def example_inputs(self, model, batch_size=1, seq_len=128):
        return image_inputs(model, batch_size)


register_architecture(ResNetAdapter())

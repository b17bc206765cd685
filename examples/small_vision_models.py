"""Small vision models built from their configs (no pretrained weights ship offline), shared by the examples."""

from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

ARCHITECTURES = ["resnet", "swin", "mobilenet_v2", "vit"]


def small_model(arch: str, image_size: int, num_labels: int):
    """A randomly initialised ResNet, Swin, MobileNetV2 or ViT sized for ``image_size`` digit images."""
    if arch == "swin":
        return SwinForImageClassification(
            SwinConfig(
                image_size=image_size,
                patch_size=2,
                embed_dim=32,
                depths=[2, 4],
                num_heads=[2, 4],
                window_size=4,
                num_labels=num_labels,
            )
        )
    if arch == "vit":
        return ViTForImageClassification(
            ViTConfig(
                image_size=image_size,
                patch_size=4,
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=128,
                num_labels=num_labels,
            )
        )
    if arch == "mobilenet_v2":
        return MobileNetV2ForImageClassification(
            MobileNetV2Config(image_size=image_size, depth_multiplier=0.5, num_labels=num_labels)
        )
    if arch == "resnet":
        return ResNetForImageClassification(
            ResNetConfig(
                embedding_size=16,
                hidden_sizes=[16, 32, 64],
                depths=[3, 3, 3],
                layer_type="basic",
                num_labels=num_labels,
            )
        )
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")

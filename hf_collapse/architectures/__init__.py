"""Model families hf_collapse knows: one module per family, each registering its adapter."""

from .base import (
    ActivationSite,
    ArchitectureAdapter,
    Block,
    adapter_for,
    register_architecture,
    supported_families,
    unregister_architecture,
    unwrap_model,
)

# Importing a family module registers its adapter. ``decoder`` first: it recognises decoders by structure and is
# tried last, after every family that has its own adapter.
from . import decoder  # noqa: E402,F401  isort: skip
from . import bert, dit, gpt2, mobilenet_v2, resnet, swin, unet, vit  # noqa: E402,F401

__all__ = [
    "ActivationSite",
    "ArchitectureAdapter",
    "Block",
    "adapter_for",
    "register_architecture",
    "supported_families",
    "unregister_architecture",
    "unwrap_model",
]

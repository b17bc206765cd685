"""LaCoOT (Quétu et al., 2024, "Layer Collapse through Optimal Transport"): train with a Max-Sliced Wasserstein
penalty between each block's input and output, then remove the blocks closest to the identity."""

from .arguments import LaCoOTArguments
from .trainer import LaCoOTTrainer

__all__ = ["LaCoOTArguments", "LaCoOTTrainer"]

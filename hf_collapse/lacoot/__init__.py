"""LaCoOT (Quétu et al., 2024, "Layer Collapse through Optimal Transport"): train with a Max-Sliced Wasserstein
penalty between each block's input and output, then remove the blocks closest to the identity.

:class:`MSWPenalty` is the penalty for any training loop (plain PyTorch, accelerate, FSDP2); :class:`LaCoOTTrainer`
is the same penalty inside a ``transformers.Trainer``, configured by :class:`LaCoOTArguments`."""

from .arguments import LaCoOTArguments
from .penalty import MSWPenalty
from .trainer import LaCoOTTrainer

__all__ = ["LaCoOTArguments", "LaCoOTTrainer", "MSWPenalty"]

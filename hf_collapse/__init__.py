"""hf_collapse: make Hugging Face models shallower (LaCoOT, TLC) and fine-tune them under a memory budget (TraDy).

The foundation is depth surgery that reloads exactly::

    import hf_collapse
    blocks = hf_collapse.find_blocks(model)                 # removable blocks, through task heads and peft
    smaller = hf_collapse.remove_blocks(model, ["encoder.layer.3"])   # a new model; `model` is untouched
    smaller.save_pretrained("out")
    again = hf_collapse.AutoCollapsedModel.from_pretrained("out")    # always exact
"""

from .architectures import (
    ActivationSite,
    ArchitectureAdapter,
    Block,
    adapter_for,
    register_architecture,
    supported_families,
    unregister_architecture,
)
from .loading import AutoCollapsedModel
from .surgery import collapse_record, find_blocks, remove_blocks

__version__ = "0.1.0.dev0"

__all__ = [
    "ActivationSite",
    "ArchitectureAdapter",
    "AutoCollapsedModel",
    "Block",
    "adapter_for",
    "collapse_record",
    "find_blocks",
    "register_architecture",
    "remove_blocks",
    "supported_families",
    "unregister_architecture",
]

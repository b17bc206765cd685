"""hf_collapse: make Hugging Face models shallower (LaCoOT, TLC) and fine-tune them under a memory budget (TraDy).

TraDy (a peft method)::

    model = peft.get_peft_model(model, hf_collapse.TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    hf_collapse.trady.calibrate(model, calibration_batches)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[hf_collapse.TraDyCallback()]).train()

LaCoOT::

    args = hf_collapse.LaCoOTArguments("out", msw_weight=1.0, num_train_epochs=3)
    trainer = hf_collapse.LaCoOTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
    trainer.train()
    collapsed, report = trainer.collapse(max_metric_drop=0.02)

All of it stands on depth surgery that reloads exactly::

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
from .collapse import collapse
from . import hub, tlc, trady  # importing trady registers "TRADY" with peft (PeftModel.from_pretrained needs it)
from .hub import push_to_hub
from .lacoot import LaCoOTArguments, LaCoOTTrainer
from .loading import AutoCollapsedModel
from .report import CollapseReport, CollapseStep
from .scoring import score_blocks
from .surgery import collapse_record, find_blocks, remove_blocks
from .tlc import TLCConfig
from .trady import TraDyCallback, TraDyConfig, TraDyModel

__version__ = "0.1.0.dev0"

__all__ = [
    "ActivationSite",
    "ArchitectureAdapter",
    "AutoCollapsedModel",
    "Block",
    "CollapseReport",
    "CollapseStep",
    "LaCoOTArguments",
    "LaCoOTTrainer",
    "TLCConfig",
    "TraDyCallback",
    "TraDyConfig",
    "TraDyModel",
    "adapter_for",
    "collapse",
    "collapse_record",
    "find_blocks",
    "hub",
    "push_to_hub",
    "register_architecture",
    "remove_blocks",
    "score_blocks",
    "supported_families",
    "tlc",
    "trady",
    "unregister_architecture",
]

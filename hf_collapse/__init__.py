"""hf_collapse: make Hugging Face models shallower (LaCoOT, TLC) and fine-tune them under a memory budget (TraDy).

TraDy (a peft method)::

    model = peft.get_peft_model(model, hf_collapse.TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    Trainer(model=model, args=args, train_dataset=train, callbacks=[hf_collapse.TraDyCallback()]).train()
    # the callback calibrates the adapter when training begins and re-samples its channels every epoch
    # to reload: `import hf_collapse.trady` (registers TraDy with peft), then PeftModel.from_pretrained(...)

LaCoOT::

    args = hf_collapse.LaCoOTArguments("out", msw_weight=1.0, num_train_epochs=3)
    trainer = hf_collapse.LaCoOTTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation)
    trainer.train()
    collapsed, report = trainer.collapse(max_metric_delta=0.02)   # decided on validation data; or num_units=3

All of it stands on depth surgery that reloads exactly::

    import hf_collapse
    blocks = hf_collapse.find_blocks(model)                 # removable blocks, through task heads and peft
    smaller = hf_collapse.remove_blocks(model, [blocks[3].name])     # a new model; `model` is untouched
    smaller.save_pretrained("out")
    again = hf_collapse.AutoCollapsedModel.from_pretrained("out")    # always exact

Importing the package has no side effect and imports nothing heavy: every public name is loaded on first use
(PEP 562). ``hf_collapse.trady`` registers TraDy with peft when it is first imported (``import hf_collapse.trady``,
or the first use of ``hf_collapse.TraDyConfig`` and the other TraDy names).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

#: public name -> the submodule that defines it (imported on first access)
_LAZY_NAMES = {
    "ActivationSite": "architectures",
    "ArchitectureAdapter": "architectures",
    "Block": "architectures",
    "adapter_for": "architectures",
    "register_architecture": "architectures",
    "supported_families": "architectures",
    "unregister_architecture": "architectures",
    "collapse": "removal",
    "prune": "removal",
    "DistillationTrainer": "healing",
    "heal": "healing",
    "run_pipeline": "pipeline",
    "push_to_hub": "hub",
    "LaCoOTArguments": "lacoot",
    "LaCoOTTrainer": "lacoot",
    "MSWPenalty": "lacoot",
    "AutoCollapsedModel": "loading",
    "Budget": "budget",
    "CollapseReport": "report",
    "CollapseStep": "report",
    "score_blocks": "scoring",
    "collapse_record": "surgery",
    "find_blocks": "surgery",
    "remove_blocks": "surgery",
    "TLCConfig": "tlc",
    "TraDyCallback": "trady",
    "TraDyConfig": "trady",
    "TraDyModel": "trady",
}

__all__ = [
    "ActivationSite",
    "ArchitectureAdapter",
    "AutoCollapsedModel",
    "Block",
    "Budget",
    "CollapseReport",
    "CollapseStep",
    "DistillationTrainer",
    "LaCoOTArguments",
    "LaCoOTTrainer",
    "MSWPenalty",
    "TLCConfig",
    "TraDyCallback",
    "TraDyConfig",
    "TraDyModel",
    "adapter_for",
    "collapse",
    "collapse_record",
    "find_blocks",
    "heal",
    "hub",
    "prune",
    "push_to_hub",
    "register_architecture",
    "remove_blocks",
    "run_pipeline",
    "score_blocks",
    "supported_families",
    "tlc",
    "trady",
    "unregister_architecture",
]


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule such as ``hf_collapse.trady``) on first access."""
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""TraDy (Quélennec et al., "Study of Training Dynamics for Memory-Constrained Fine-Tuning", 2025) as a peft method.

TraDy fine-tunes a pretrained network under a hard memory budget. The unit is an *input channel* of a conv/linear
weight: updating it needs only that channel's input activation and gives only that slice of the weight gradient.
The layers worth updating are ranked once, a priori, by their reweighted gradient norm; inside them the updated
channels are re-sampled at random every epoch.

Importing this package registers ``"TRADY"`` with peft, so that ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle it like any built-in method (import it before loading a TraDy adapter)::

    from peft import PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments
    from hf_collapse.trady import TraDyCallback, TraDyConfig, calibrate, memory_report

    model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    calibrate(model, calibration_batches)         # a priori ranking + cost model, before the optimizer exists
    args = TrainingArguments("out", learning_rate=5e-4, optim="sgd", num_train_epochs=5)   # ~10x full FT's lr
    Trainer(model=model, args=args, train_dataset=train, callbacks=[TraDyCallback()]).train()
    print(memory_report(model, batch).to_markdown())
    model.save_pretrained("adapter")
    again = PeftModel.from_pretrained(fresh_base, "adapter")      # exact
    plain = again.merge_and_unload()                               # a plain transformers model

What TraDy saves, and what it cannot: it removes the activations the target layers keep *for their weight
gradients* (all but the selected channels) and the weight gradients themselves, and nothing is stored below the
lowest selected layer. The rest of the network still stores what it needs to *propagate* gradients (attention
probabilities, norm statistics, activation functions' inputs, dropout masks): measured with :func:`memory_report`,
that part alone is 65% of full fine-tuning's saved bytes on MiniLM (batch 32 x 20 tokens) and 70-85% on a tiny
RoBERTa, so at a 5% budget TraDy's total is about 0.6x full fine-tuning's, not 0.05x. Restricting the selection to
the top of the network (``max_depth``) is what shrinks that part: backpropagation stops at the lowest selected layer.
"""

from __future__ import annotations

import enum

__all__ = [
    "ChannelSliceFunction",
    "LayerCost",
    "MemoryReport",
    "SELECTIONS",
    "TraDyCallback",
    "TraDyConfig",
    "TraDyLayer",
    "TraDyModel",
    "calibrate",
    "find_trady_model",
    "memory_report",
    "peak_memory_bytes",
    "register_trady_with_peft",
]

PEFT_TYPE_NAME = "TRADY"


def _extend_peft_type(name: str) -> enum.Enum:
    """Add ``name`` to peft's closed ``PeftType`` enum (a ``str`` Enum) and return the new member.

    peft's ``register_peft_method`` refuses names outside ``PeftType``, and Python enums cannot be subclassed or
    extended through a public API, so this is the one place that touches enum internals. It fails loudly if they
    are not what it expects.
    """
    from peft.utils import peft_types

    peft_type = getattr(peft_types, "PeftType", None)
    if not (isinstance(peft_type, enum.EnumMeta) and issubclass(peft_type, str)):
        raise RuntimeError(f"hf_collapse.trady cannot register with this peft: peft.utils.peft_types.PeftType is "
                           f"{peft_type!r}, not a str Enum as in peft 0.17-0.21; please report this")
    if name in peft_type.__members__:
        return peft_type[name]
    for attribute in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(peft_type, attribute):
            raise RuntimeError(f"hf_collapse.trady cannot extend peft's PeftType: the enum has no {attribute} "
                               "(Python's enum internals changed); please report this")
    member = str.__new__(peft_type, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = peft_type
    member.__init__(name)
    peft_type._member_map_[name] = member
    peft_type._value2member_map_[name] = member
    peft_type._member_names_.append(name)
    type.__setattr__(peft_type, name, member)
    if peft_type(name) is not member or peft_type[name] is not member or member not in list(peft_type):
        raise RuntimeError("hf_collapse.trady could not extend peft's PeftType enum; please report this")
    return member


def register_trady_with_peft() -> None:
    """Make ``"TRADY"`` a peft method: extend ``PeftType`` and call peft's own ``register_peft_method``.

    Idempotent; runs on import of :mod:`hf_collapse.trady`.

    Raises:
        RuntimeError: when peft's registry is not what this code was written for (with the reason).

    Example::

        >>> from peft import PeftType
        >>> hf_collapse.trady.register_trady_with_peft()        # already done by the import; a no-op
        >>> PeftType("TRADY")
        <PeftType.TRADY: 'TRADY'>
    """
    from peft import mapping
    from peft.utils import peft_types

    register = getattr(peft_types, "register_peft_method", None)
    if register is None:
        raise RuntimeError("hf_collapse.trady needs peft's register_peft_method (peft >= 0.15); please upgrade peft")
    member = _extend_peft_type(PEFT_TYPE_NAME)
    if mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(member) is TraDyModel:
        return
    register(name=PEFT_TYPE_NAME.lower(), config_cls=TraDyConfig, model_cls=TraDyModel, prefix=TraDyModel.prefix)
    if mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE_NAME) is not TraDyConfig:
        raise RuntimeError("peft's register_peft_method did not register TraDy; please report this")


from .callback import TraDyCallback  # noqa: E402
from .config import SELECTIONS, TraDyConfig  # noqa: E402
from .layer import ChannelSliceFunction, TraDyLayer  # noqa: E402
from .memory import MemoryReport, memory_report, peak_memory_bytes  # noqa: E402
from .model import TraDyModel, calibrate, find_trady_model  # noqa: E402
from .selection import LayerCost  # noqa: E402

register_trady_with_peft()

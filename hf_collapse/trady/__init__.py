"""TraDy (Quélennec et al., "Study of Training Dynamics for Memory-Constrained Fine-Tuning", 2025) as a peft method.

TraDy fine-tunes a pretrained network under a hard memory budget. The unit is an *input channel* of a conv/linear
weight: updating it needs only that channel's input activation and gives only that slice of the weight gradient.
The layers worth updating are ranked once, a priori, by their reweighted gradient norm; inside them the updated
channels are re-sampled at random every epoch.

Importing this package registers ``"TRADY"`` with peft, so that ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle it like any built-in method: ``import hf_collapse.trady`` before loading a TraDy
adapter (``import hf_collapse`` alone leaves peft untouched; touching ``hf_collapse.TraDyConfig`` imports this
package). A ``Trainer`` drives the adapter through a :class:`TraDyCallback` passed in its ``callbacks``: it calibrates
the adapter on the first batches of the training data when training begins (unless :func:`calibrate` did, which lets
you choose the batches, and which multi-process training needs before the Trainer is built), re-samples the
channels at every epoch and checkpoints the run state::

    from peft import PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments
    from hf_collapse.trady import TraDyCallback, TraDyConfig, calibrate, memory_report

    model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    calibrate(model, calibration_batches)         # optional on one process: a priori ranking + cost model
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
:func:`step_memory` measures the whole peak of a training step (parameters, gradients, optimizer state,
activations), where TraDy's small gradients and optimizer state show. Both are :mod:`hf_collapse.profiling`'s, for
any model; they are exported here too. ``TraDyConfig(peak_bytes=...)`` makes that peak the budget: calibration plans
the channels, the depth and gradient checkpointing so that the measured step stays under it
(:mod:`~hf_collapse.trady.planning`).

Decoder LMs: the default targets are every ``nn.Linear`` projection (Llama-style q/k/v/o/gate/up/down) or GPT-2
``Conv1D`` except the LM head, trained on causal-LM batches (``-100`` labels are ignored as usual). Gradient
checkpointing (``gradient_checkpointing_enable()`` or ``TrainingArguments(gradient_checkpointing=True)``, reentrant
or not) gives the same loss and gradients and composes with TraDy's savings. The budget can be given in bytes
(``TraDyConfig(budget_bytes=...)``). TraDy runs on one device or under DDP; under FSDP, DeepSpeed ZeRO or DTensor
parameters it refuses at calibration and when training starts (:mod:`~hf_collapse.trady.sharding`). The command
``hf-collapse trady`` does all of this on a causal LM in one go.
"""

from __future__ import annotations

from .. import compat

__all__ = [
    "ChannelSelection",
    "ChannelSliceFunction",
    "ChannelSampler",
    "LayerCost",
    "MemoryReport",
    "PeakBudgetError",
    "PeakPlan",
    "SELECTIONS",
    "ShardedTrainingError",
    "StepMemory",
    "TraDyCallback",
    "TraDyConfig",
    "TraDyLayer",
    "TraDyModel",
    "calibrate",
    "find_trady_model",
    "memory_report",
    "peak_memory_bytes",
    "register_trady_with_peft",
    "step_memory",
]

PEFT_TYPE_NAME = "TRADY"


def register_trady_with_peft() -> None:
    """Make ``"TRADY"`` a peft method: extend ``PeftType`` and call peft's own ``register_peft_method``.

    Idempotent; runs on the first import of :mod:`hf_collapse.trady` (``import hf_collapse`` alone does not touch
    peft). The private peft APIs this needs live in :mod:`hf_collapse.compat`.

    Raises:
        hf_collapse.compat.CompatibilityError: when peft's registry is not what this code was written for.

    Example::

        >>> import hf_collapse.trady
        >>> from peft import PeftType
        >>> hf_collapse.trady.register_trady_with_peft()        # already done by the import; a no-op
        >>> PeftType("TRADY")
        <PeftType.TRADY: 'TRADY'>
    """
    compat.register_peft_method(PEFT_TYPE_NAME, config_cls=TraDyConfig, model_cls=TraDyModel, prefix=TraDyModel.prefix)


from ..profiling import MemoryReport, StepMemory, memory_report, peak_memory_bytes, step_memory  # noqa: E402
from .callback import TraDyCallback  # noqa: E402
from .config import SELECTIONS, TraDyConfig  # noqa: E402
from .layer import ChannelSliceFunction, TraDyLayer  # noqa: E402
from .model import TraDyModel, calibrate, find_trady_model  # noqa: E402
from .planning import PeakBudgetError, PeakPlan  # noqa: E402
from .sampling import ChannelSampler  # noqa: E402
from .selection import LayerCost  # noqa: E402
from .sharding import ShardedTrainingError  # noqa: E402
from .strategies import ChannelSelection  # noqa: E402

register_trady_with_peft()

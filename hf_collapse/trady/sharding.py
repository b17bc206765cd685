"""Refusals under sharded training: TraDy runs on one device or under DDP, never under FSDP or DeepSpeed ZeRO.

TraDy merges each epoch's channel updates into ``base_layer.weight.data`` in place, reads and writes weight slices
by input channel, and zeroes and resizes one flat parameter. Under FSDP (``FullyShardedDataParallel`` or
``fully_shard``'s DTensor parameters) and DeepSpeed ZeRO each rank holds a shard of these tensors (or an empty
placeholder), so those writes would touch the wrong elements or none and training would go on, silently wrong. So
TraDy refuses, when calibrating, at the first training forward and when a Trainer starts, as soon as it sees:

* the Trainer's accelerator in FSDP or DeepSpeed mode (``trainer.is_fsdp_enabled`` / ``is_deepspeed_enabled``, or
  ``accelerate``'s ``AcceleratorState().distributed_type``);
* an FSDP-wrapped module (FSDP1 ``FullyShardedDataParallel``, FSDP2 ``FSDPModule``) in the model;
* a DTensor parameter (FSDP2, tensor parallelism) or a DeepSpeed ZeRO-3 partitioned parameter (``ds_id``).

Data parallelism that replicates the parameters (DDP, ``torchrun``, ``accelerate launch`` multi-GPU / multi-CPU) is
supported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "SUPPORTED_PARALLELISM",
    "ShardedTrainingError",
    "check_not_sharded",
    "sharding_in_accelerator",
    "sharding_in_model",
]

#: What TraDy supports, for the refusal messages.
SUPPORTED_PARALLELISM = (
    "a single device (CPU or one accelerator) and DDP (torchrun, or accelerate launch / "
    "Trainer with replicated parameters)"
)


class ShardedTrainingError(RuntimeError):
    """TraDy was asked to run on sharded parameters (FSDP, DeepSpeed ZeRO, DTensor)."""


def sharding_in_model(model: nn.Module) -> str | None:
    """What shards ``model``'s parameters, in words, or ``None`` when nothing does.

    Example::

        >>> sharding_in_model(nn.Linear(2, 2)) is None
        True
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        FullyShardedDataParallel = ()  # type: ignore[assignment]
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()  # type: ignore[assignment]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    for name, module in model.named_modules():
        if FullyShardedDataParallel and isinstance(module, FullyShardedDataParallel):
            return f"FSDP (FullyShardedDataParallel at {name or 'the model'!r})"
        if FSDPModule and isinstance(module, FSDPModule):
            return f"FSDP2 (fully_shard applied to {name or 'the model'!r})"
    for name, parameter in model.named_parameters():
        if DTensor and isinstance(parameter, DTensor):
            return f"DTensor parameters (FSDP2 / tensor parallelism: {name!r} is a DTensor)"
        if hasattr(parameter, "ds_id"):
            return f"DeepSpeed ZeRO-3 partitioned parameters ({name!r})"
    return None


def sharding_in_accelerator(trainer: Any = None) -> str | None:
    """FSDP or DeepSpeed in ``trainer``'s accelerator or in ``accelerate``'s process-wide state, in words, or ``None``.

    Reads ``trainer.is_fsdp_enabled`` / ``trainer.is_deepspeed_enabled`` (set by ``transformers.Trainer`` from its
    accelerator) and, when an ``Accelerator`` was created in this process, ``AcceleratorState().distributed_type``.
    """
    if trainer is not None:
        if getattr(trainer, "is_fsdp_enabled", False):
            return "FSDP (the Trainer's accelerator has an FSDP plugin)"
        if getattr(trainer, "is_deepspeed_enabled", False):
            return "DeepSpeed (the Trainer's accelerator has a DeepSpeed plugin)"
    try:
        from accelerate.state import AcceleratorState, is_initialized
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate comes with transformers' Trainer
        return None
    if not is_initialized():
        return None  # reading AcceleratorState() would create one
    kind = getattr(AcceleratorState(), "distributed_type", None)
    if kind == DistributedType.FSDP:
        return "FSDP (accelerate's distributed_type is FSDP)"
    if kind == DistributedType.DEEPSPEED:
        return "DeepSpeed (accelerate's distributed_type is DEEPSPEED)"
    return None


def check_not_sharded(model: nn.Module | None = None, trainer: Any = None, action: str = "train") -> None:
    """Refuse to ``action`` when the model's parameters are sharded or the accelerator shards them.

    Raises:
        ShardedTrainingError: naming what shards the parameters and what is supported.

    Example::

        >>> check_not_sharded(nn.Linear(2, 2), action="calibrate")   # one device: nothing to refuse
    """
    found = sharding_in_accelerator(trainer)
    if found is None and model is not None:
        found = sharding_in_model(model)
    if found is not None:
        raise ShardedTrainingError(
            f"TraDy cannot {action} under {found}: it merges channel updates into the base weights in place and "
            "resizes and resets one flat parameter, which sharded parameters would silently lose or corrupt. "
            f"Supported: {SUPPORTED_PARALLELISM}; for memory savings on top, combine TraDy with gradient "
            "checkpointing or mixed precision, not with parameter sharding."
        )

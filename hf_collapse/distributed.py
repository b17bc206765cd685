"""Agreement across DDP ranks: quantities that decide a model's structure are reduced over every rank, so that
each rank removes the same blocks and collapses the same layers even though it saw only its own data shard.

Collapse after FSDP2: a model sharded with ``torch.distributed.fsdp.fully_shard`` holds only a shard of each
parameter on each rank, while surgery and ``save_pretrained`` need the whole model. :func:`unsharded_copy` gathers
it (a collective call: every rank calls it) into a plain model on the main process::

    penalty = MSWPenalty(model)                   # before sharding: the hooks stay on the same modules
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ...                                           # train with task loss + λ·penalty()
    scores = hf_collapse.score_blocks(model, eval_loader, method="msw")   # every rank, its own shard: pooled
    full = unsharded_copy(model)                  # every rank calls it; a plain model on rank 0, None elsewhere
    if full is not None:
        collapsed, report = hf_collapse.collapse(full, scores, num_units=2)
        collapsed.save_pretrained("collapsed")     # reloads with plain from_pretrained
"""

from __future__ import annotations

import os
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "from_main_process",
    "full_state_dict",
    "is_distributed",
    "is_main_process",
    "is_sharded",
    "sum_across_ranks",
    "unsharded_copy",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialized with more than one rank.

    Example::

        >>> from hf_collapse.distributed import is_distributed
        >>> is_distributed()              # one process, or before init_process_group
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes of the initialized process group (1 without one).

    Example::

        >>> from hf_collapse.distributed import world_size
        >>> world_size()                  # one process, or before init_process_group
        1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process should print, show progress bars, write files and push (rank 0, or a single process).

    Before the process group exists, the launcher's ``RANK`` variable decides (torchrun and accelerate set it).

    Example::

        >>> from hf_collapse.distributed import is_main_process
        >>> if is_main_process():                 # e.g. report.save("outputs/collapse")
        ...     print("saving")
        saving
    """
    if is_distributed():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (``tensor`` itself when not distributed).

    The sum is computed in float64 and returned in ``tensor``'s dtype and device; ``tensor`` is not modified.

    Example::

        >>> import torch
        >>> from hf_collapse.distributed import sum_across_ranks
        >>> correct, seen = 30, 40
        >>> total = sum_across_ranks(torch.tensor([correct, seen], dtype=torch.float64))   # this rank's shard
        >>> float(total[0] / total[1])                   # over every shard (here: one process)
        0.75
    """
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = tensor.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(reduced)
    return reduced.to(device=tensor.device, dtype=tensor.dtype)


def from_main_process(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself when not distributed): a decision every rank must share.

    Example::

        >>> from hf_collapse.distributed import from_main_process
        >>> from_main_process({"budget_elements": 1024.0})   # one process: the value itself
        {'budget_elements': 1024.0}
    """
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds sharded parameters: FSDP2 (``fully_shard``: ``DTensor`` parameters) or FSDP1 (a
    ``FullyShardedDataParallel`` module anywhere in it). Surgery and ``save_pretrained`` need an
    :func:`unsharded_copy` of such a model.

    Example::

        >>> import torch
        >>> from hf_collapse.distributed import is_sharded
        >>> is_sharded(torch.nn.Linear(2, 3))
        False
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a model sharded with FSDP2 (``fully_shard``), or of any other model.

    A collective call under FSDP: every rank must call it. With ``cpu_offload=True`` (the default: the full model
    never has to fit on an accelerator) the tensors land on the CPU of the main process only, and the other ranks get
    an empty dict; with ``cpu_offload=False`` every rank gets every tensor on its device. This is
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=
    True, cpu_offload=cpu_offload))``; for a model that is not sharded it is a detached copy of ``model.state_dict()``.

    Example::

        >>> import torch
        >>> from hf_collapse.distributed import full_state_dict
        >>> sorted(full_state_dict(torch.nn.Linear(2, 3)))      # one process: the model's own state dict
        ['bias', 'weight']
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {
            name: tensor.detach().cpu().clone() if cpu_offload else tensor.detach().clone()
            for name, tensor in model.state_dict().items()
        }
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps a module's class for a subclass of ``(FSDPModule, cls)``; FSDP1
    wraps the module instead."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch without FSDP: nothing can have been swapped
        return type(model)
    while isinstance(model, FullyShardedDataParallel):
        model = model.module
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(model)  # pragma: no cover - FSDPModule itself is always in the MRO above `object`


def unsharded_copy(
    model: nn.Module, factory: Callable[[], nn.Module] | None = None, all_ranks: bool = False
) -> nn.Module | None:
    """A plain, unsharded copy of ``model`` on the main process (``None`` on the other ranks), ready for
    ``hf_collapse.collapse`` / ``remove_blocks`` and ``save_pretrained``.

    A collective call under FSDP: every rank must call it (see :func:`full_state_dict`). ``all_ranks=True`` gives
    every rank its own copy (the full tensors are then gathered on each rank's device first), for code that collapses
    on every rank, deterministically, as under DDP. The copy is built on the CPU
    by ``factory()`` when given, else from the model's config (``cls(config)`` for a transformers model,
    ``cls.from_config(config)`` for a diffusers one, where ``cls`` is the class the model had before ``fully_shard``),
    then loads the gathered state dict strictly (every tensor must match). ``model`` is untouched; the copy is in
    ``model``'s train/eval mode.

    Raises:
        ValueError: when no ``factory`` is given and the model has no config to rebuild it from.

    Example::

        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_collapse.distributed import unsharded_copy
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=24))
        >>> copy = unsharded_copy(model)              # under FSDP2: call it on every rank; None off the main process
        >>> copy is not model and torch.equal(copy.classifier.weight, model.classifier.weight)
        True
    """
    state = full_state_dict(model, cpu_offload=not all_ranks)
    if not all_ranks and not is_main_process():
        return None
    if factory is not None:
        copy = factory()
    else:
        cls, config = _unsharded_class(model), getattr(model, "config", None)
        if config is None:
            raise ValueError(
                f"{type(model).__name__} has no config to rebuild an unsharded copy from: pass "
                "factory=lambda: <a new, unsharded instance of the model>"
            )
        if hasattr(cls, "config_class"):  # transformers: cls(config), a config of its own
            copy = cls(deepcopy(config))
        elif hasattr(cls, "from_config"):  # diffusers
            copy = cls.from_config(deepcopy(config))
        else:
            raise ValueError(
                f"cannot rebuild {cls.__name__} from its config: pass factory=lambda: <a new, unsharded "
                "instance of the model>"
            )
    copy.load_state_dict(state, strict=True)
    return copy.train(model.training)

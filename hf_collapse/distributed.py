"""Agreement across DDP ranks: quantities that decide a model's structure are reduced over every rank, so that
each rank removes the same blocks and collapses the same layers even though it saw only its own data shard."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "is_main_process", "sum_across_ranks"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialized with more than one rank.

    Example::

        >>> from hf_collapse.distributed import is_distributed
        >>> is_distributed()              # one process, or before init_process_group
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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

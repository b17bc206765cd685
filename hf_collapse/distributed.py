"""Agreement across DDP ranks: quantities that decide a model's structure are reduced over every rank, so that
each rank removes the same blocks and collapses the same layers even though it saw only its own data shard."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "sum_across_ranks"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (``tensor`` itself when not distributed)."""
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = tensor.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(reduced)
    return reduced.to(device=tensor.device, dtype=tensor.dtype)

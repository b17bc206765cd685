"""One SGD step of LaCoOTTrainer on 2 ranks (gloo) where both ranks read the same local batch; started by
tests/test_lacoot_lifecycle.py with torchrun. Rank 0 writes the weights after the step to OUT/<task>_<λ>.pt.

Then one SFT step where rank 0's first micro-batch has nothing to train and rank 1's second one: each rank writes how
it decided the loss is normalised to OUT/normalization_rank<r>.txt (they must agree)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from test_lacoot_lifecycle import TASKS, _one_step, _sft_step  # noqa: E402
from toy_training import finish_distributed  # noqa: E402

out = sys.argv[1]
for task in TASKS:
    for weight in (0.0, 1.0):
        weights = _one_step(os.path.join(out, f"run_{task}_{weight}"), task, weight, 1, ddp_backend="gloo")
        if int(os.environ["RANK"]) == 0:
            assert dist.get_world_size() == 2
            torch.save(weights, os.path.join(out, f"{task}_{weight}.pt"))
rank = int(os.environ["RANK"])
_, normalization = _sft_step(os.path.join(out, "sft"), prompt_only_first=rank == 0, weight=1.0, ddp_backend="gloo")
with open(os.path.join(out, f"normalization_rank{rank}.txt"), "w") as file:
    file.write(str(normalization))
finish_distributed()

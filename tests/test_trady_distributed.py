"""TraDy under real 2-rank DDP (torchrun, gloo on CPU): every rank draws the same channels every epoch, the
weights stay identical across ranks and the loss decreases."""

import pytest
import torch
from test_distributed import torchrun


@pytest.mark.slow
def test_trady_draws_the_same_channels_on_every_rank(tmp_path):
    torchrun("trady_ddp.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["selected_layers"] == ranks[1]["selected_layers"] and ranks[0]["selected_layers"]
    assert ranks[0]["capacity"] == ranks[1]["capacity"]
    selections = [r["selections"] for r in ranks]
    assert len(selections[0]) == 10 and selections[0] == selections[1]
    assert selections[0][0] != selections[0][1] != selections[0][2]  # re-sampled at each epoch boundary
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name  # merged base weights included
    losses = ranks[0]["losses"]
    assert len(losses) == 40  # 32 examples / (2 ranks x 4) x 10 epochs
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8  # the channel updates do learn the task
    # a peak budget planned on batches of different shapes: every rank holds rank 0's plan and its size
    assert ranks[0]["peak_plan"] == ranks[1]["peak_plan"] and ranks[0]["peak_capacity"] == ranks[1]["peak_capacity"]
    for rank in ranks:  # no calibrate before the Trainer: refused on every rank, saying what to do
        assert rank["refusal"] and "under multi-process training (2 processes)" in rank["refusal"]
        assert (
            "hf_collapse.trady.calibrate(model, batches) on every rank before building the Trainer" in rank["refusal"]
        )

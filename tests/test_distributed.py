"""Real multi-process runs: 2-rank DDP on CPU with torchrun (gloo).

What the MSW penalty sees under DDP: each rank's local batch (documented in hf_collapse.lacoot.trainer);
whatever decides the model's structure (block scores, TLC statistics and calibration losses) is pooled over
the ranks, so both ranks build the same model, and only the main process saves and pushes.
"""

import os
import subprocess
import sys

import pytest
import torch
from local_hub import running_hub

HERE = os.path.dirname(__file__)


def torchrun(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(HERE, "distributed", script),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _same_weights(ranks):
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name


@pytest.mark.slow
def test_lacoot_trainer_ddp_two_ranks(tmp_path):
    with running_hub(tmp_path / "hub") as endpoint:  # also push from both ranks: only the main process may publish
        torchrun(
            "lacoot_ddp.py",
            str(tmp_path),
            env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")},
        )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    _same_weights(ranks)
    losses = ranks[0]["losses"]
    assert len(losses) == 24  # 32 examples / (2 ranks x 4) x 6 epochs
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    # Each rank's penalty saw its own local batch, so the refined directions may differ; the weights stay
    # identical because DDP averages the gradients.
    assert set(ranks[0]["directions"]) == set(ranks[1]["directions"]) == {f"bert.encoder.layer.{i}" for i in range(3)}
    # Scores are pooled over the ranks' eval shards: both ranks remove the same block, with the same metrics.
    assert ranks[0]["scores"] == ranks[1]["scores"] and len(ranks[0]["scores"]) == 3
    assert ranks[0]["removed"] == ranks[1]["removed"] and ranks[0]["metrics"] == ranks[1]["metrics"]
    assert (tmp_path / "collapsed" / "README.md").is_file()
    assert ranks[1]["pushed"] is None and ranks[0]["pushed"]
    assert (tmp_path / "hub" / "tester" / "ddp-collapsed" / "model.safetensors").is_file()


@pytest.mark.slow
def test_tlc_compress_ddp_two_ranks(tmp_path):
    torchrun("tlc_ddp.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["edits"] == ranks[1]["edits"] and len(ranks[0]["edits"]) == 2
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    _same_weights(ranks)
    first, last = ranks[0]["finetune_losses"][0], ranks[0]["finetune_losses"][-1]
    assert len(first) == len(last) == 8 and ranks[0]["finetune_losses"] == ranks[1]["finetune_losses"]
    assert sum(last[-4:]) / 4 < 0.8 * sum(first[:4]) / 4  # the fine-tuning between collapses does train

"""MSWPenalty under FSDP2 on CPU (gloo), 2 ranks; started by tests/test_msw_penalty.py with torchrun.

The penalty is created BEFORE sharding (hooks on the plain modules); then ``fully_shard`` wraps each encoder
layer and the root, and a plain loop trains with task loss + λ·penalty(). Then the sharded model is scored (every
rank, pooled), gathered into an unsharded copy on rank 0, collapsed, saved and reloaded.

Each rank writes what it saw to OUT/rank<r>.pt; rank 0 also writes the collapsed model to OUT/collapsed.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from toy_training import PadOnlyCollator, accuracy, penalized_loop, tiny_bert, toy_dataset  # noqa: E402

import hf_collapse  # noqa: E402
from hf_collapse import MSWPenalty  # noqa: E402
from hf_collapse.distributed import full_state_dict, is_sharded, unsharded_copy  # noqa: E402

STEPS, BATCH, LAMBDA, LR = 4, 4, 0.5, 0.1


def batch_for(step: int, rank: int, same_data: bool) -> dict:
    """Rank-local batches (dynamic padding); with same_data every rank reads the same one."""
    rows = toy_dataset(BATCH, seed=1000 * step + (0 if same_data else 17 * (rank + 1)))
    return PadOnlyCollator()([rows[i] for i in range(len(rows))])


def train(weight: float, shard: bool, same_data: bool, rank: int):
    model = tiny_bert(seed=0)
    penalty = MSWPenalty(model, ascent_steps=2, seed=0)  # before sharding
    if shard:
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    batches = [batch_for(step, rank, same_data) for step in range(STEPS)]
    history, _ = penalized_loop(
        model, penalty, batches, weight=weight, optimizer=torch.optim.SGD(model.parameters(), lr=LR)
    )
    return model, penalty, history


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    model, penalty, history = train(LAMBDA, shard=True, same_data=False, rank=rank)
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    assert sharded and len(sharded) == len(list(model.parameters())), "fully_shard left plain parameters"

    # The penalty alone, one more batch: its gradient reaches the sharded parameters of every block.
    batch = batch_for(STEPS, rank, same_data=False)
    with penalty.capture(inputs=batch):
        model(**batch)
    penalty().backward()
    block_grads = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        grad = layer.attention.self.query.weight.grad
        assert isinstance(grad, DTensor), type(grad)
        block_grads[f"bert.encoder.layer.{i}"] = float(grad.full_tensor().norm())
    model.zero_grad(set_to_none=True)

    trained = {k: v.clone() for k, v in full_state_dict(model, cpu_offload=False).items()}  # every rank: full
    task_only, _, _ = train(0.0, shard=True, same_data=False, rank=rank)
    task_only_state = full_state_dict(task_only, cpu_offload=False)
    moved_by_penalty = max(float((trained[k] - task_only_state[k]).abs().max()) for k in trained)

    # Every rank reads the same batches: FSDP must then reproduce the one-process run exactly.
    same, same_penalty, same_history = train(LAMBDA, shard=True, same_data=True, rank=rank)
    same_state = full_state_dict(same)  # rank 0 only (cpu_offload)

    # Score the sharded model (every rank, its own eval batches, pooled), then gather and collapse on rank 0.
    eval_batches = [batch_for(100 + i, rank, same_data=False) for i in range(2)]
    model.eval()
    scores = hf_collapse.score_blocks(model, eval_batches, method="msw", progress=False)
    probe = PadOnlyCollator()([{"input_ids": [5, 6, 7, 8, 9], "label": 0}, {"input_ids": [30, 31, 32], "label": 1}])
    probe.pop("labels")
    with torch.no_grad():
        sharded_logits = model(**probe).logits  # a collective forward: every rank runs it
    full = unsharded_copy(model)
    everywhere = unsharded_copy(model, all_ranks=True)  # each rank its own whole copy
    assert is_sharded(model) and not is_sharded(everywhere)

    # LaCoOTTrainer.collapse on the sharded model (hooks registered after sharding, this time): it gathers a whole
    # copy on every rank, and every rank removes the same block with the same metrics.
    args = hf_collapse.LaCoOTArguments(
        os.path.join(out, "trainer"),
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
        per_device_eval_batch_size=8,
    )
    trainer = hf_collapse.LaCoOTTrainer(
        model=model,
        args=args,
        eval_dataset=toy_dataset(16, seed=5),
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
    )
    _, trainer_report = trainer.collapse(num_units=1, scores=scores, latency_repeats=0)
    assert is_sharded(model)  # the trained model is untouched
    trainer.penalty.remove()
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "history": history,
        "block_grads": block_grads,
        "trained": trained,
        "moved_by_penalty": moved_by_penalty,
        "scores": scores,
        "same_history": same_history,
        "sharded_logits": sharded_logits,
        "everywhere": {k: v.detach().clone() for k, v in everywhere.state_dict().items()},
        "trainer_removed": [r["name"] for r in trainer_report.removed],
        "trainer_metrics": [s.metric for s in trainer_report.steps],
    }
    if rank == 0:
        assert full is not None and not isinstance(full.classifier.weight, DTensor)
        single, _, single_history = train(LAMBDA, shard=False, same_data=True, rank=0)
        result["same_vs_single"] = max(float((same_state[k] - v).abs().max()) for k, v in single.state_dict().items())
        result["single_history"] = single_history
        with torch.no_grad():
            result["copy_vs_sharded"] = float((full.eval()(**probe).logits - sharded_logits).abs().max())
        collapsed, report = hf_collapse.collapse(full, scores, num_units=1, latency_repeats=0, progress=False)
        collapsed.save_pretrained(os.path.join(out, "collapsed"))
        with torch.no_grad():
            result["collapsed_logits"] = collapsed.eval()(**probe).logits
        result["removed"] = [r["name"] for r in report.removed]
        result["probe"] = probe
    else:
        assert full is None
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    penalty.remove()
    same_penalty.remove()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

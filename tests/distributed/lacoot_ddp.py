"""A 2-rank DDP run of LaCoOTTrainer on CPU (gloo), started by tests/test_distributed.py with torchrun.

Each rank writes its final weights, its loss history and its first-batch MSW directions to OUT/rank<r>.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from toy_training import PadOnlyCollator, accuracy, finish_distributed, tiny_bert, toy_dataset  # noqa: E402

from hf_collapse import LaCoOTArguments, LaCoOTTrainer, push_to_hub  # noqa: E402
from hf_collapse.hub import save_with_card  # noqa: E402


def main(out: str) -> None:
    args = LaCoOTArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        num_train_epochs=6,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
        msw_weight=0.5,
        dataloader_num_workers=0,
    )
    model = tiny_bert(seed=0)
    trainer = LaCoOTTrainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(32),
        eval_dataset=toy_dataset(16, seed=1),
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
    )
    initial_directions = {}
    original = trainer.msw_penalty

    def recording_penalty():
        result = original()
        if not initial_directions:
            initial_directions.update({k: v.clone() for k, v in trainer._directions.items()})
        return result

    trainer.msw_penalty = recording_penalty
    trainer.train()
    rank = dist.get_rank()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Every rank scores and collapses (the scores are pooled over the ranks' eval shards); one rank saves / pushes.
    scores = trainer.block_scores()
    collapsed, report = trainer.collapse(num_units=1, latency_repeats=0)
    if trainer.is_world_process_zero():
        save_with_card(collapsed, os.path.join(out, "collapsed"), report)
    pushed = (
        push_to_hub(collapsed, "tester/ddp-collapsed", report=report, token="hf_test")
        if os.environ.get("HF_ENDPOINT")
        else "no hub"
    )
    torch.save(
        {
            "state": state,
            "losses": losses,
            "world_size": dist.get_world_size(),
            "directions": initial_directions,
            "scores": scores,
            "removed": report.removed,
            "metrics": [s.metric for s in report.steps],
            "pushed": pushed,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
    finish_distributed()

"""A 2-rank DDP run of TLC's compress loop (calibration, ranking, fine-tuning) on CPU, started by
tests/test_distributed.py with torchrun. Each rank writes the compressed weights and the edits to OUT/rank<r>.pt.

Then the same run is interrupted during step 2 on both ranks and resumed from the progress folder the main
process wrote: every rank must end with the edits, metrics and weights (within 1e-5) of the uninterrupted run,
or this script fails."""

import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from toy_training import PadOnlyCollator, accuracy, finish_distributed, tiny_bert, toy_dataset  # noqa: E402

import hf_collapse  # noqa: E402
from hf_collapse.tlc import TLCConfig, compress  # noqa: E402


class Crash(RuntimeError):
    pass


class CrashOnSecondFinetune(TrainerCallback):
    def __init__(self):
        self.seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen += 1
        if self.seen == 2:
            raise Crash("simulated crash in the fine-tuning of step 2")


def run(out: str, **kwargs):
    args = TrainingArguments(
        out,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=2e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        logging_steps=1,
    )
    return compress(
        tiny_bert(seed=0),
        TLCConfig(num_units=2, calibration_batches=2, finetune_steps=8),
        toy_dataset(32),
        toy_dataset(16, seed=1),
        args,
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
        **kwargs,
    )


def main(out: str) -> None:
    compressed, report = run(out)
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in compressed.state_dict().items()},
            "edits": hf_collapse.collapse_record(compressed)["edits"],
            "world_size": dist.get_world_size(),
            "metrics": [s.metric for s in report.steps],
            "finetune_losses": [s.details["finetune_losses"] for s in report.steps[1:]],
        },
        os.path.join(out, f"rank{dist.get_rank()}.pt"),
    )

    interrupted = os.path.join(out, "interrupted")
    try:
        run(interrupted, callbacks=[CrashOnSecondFinetune()])
        raise AssertionError("the run was not interrupted")
    except Crash:
        pass
    resumed, resumed_report = run(interrupted, resume_from=os.path.join(interrupted, "tlc_progress"))
    assert hf_collapse.collapse_record(resumed) == hf_collapse.collapse_record(compressed)
    assert [s.metric for s in resumed_report.steps] == [s.metric for s in report.steps]
    assert [s.details.get("finetune_losses") for s in resumed_report.steps] == [
        s.details.get("finetune_losses") for s in report.steps
    ]
    expected = compressed.state_dict()
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0)


if __name__ == "__main__":
    main(sys.argv[1])
    finish_distributed()

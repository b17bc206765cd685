"""A 2-rank DDP run of a TraDy adapter under the plain transformers Trainer, on CPU (gloo); started by
tests/test_trady_distributed.py with torchrun.

Calibration batches differ per rank on purpose: calibrate() must sum its measurements over the ranks so that both
rank the layers, size the flat parameter and draw the channels alike. Each rank writes the selection it trained
with at every epoch, the selected layers and its final trainable and merged weights to OUT/rank<r>.pt, and the
error an uncalibrated adapter gets under DDP (it cannot calibrate itself there).
"""

import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from toy_training import PadOnlyCollator, finish_distributed, tiny_bert, toy_dataset  # noqa: E402

from hf_collapse.trady import TraDyCallback, TraDyConfig, calibrate, find_trady_model, step_memory  # noqa: E402


class Recorder(TrainerCallback):
    def __init__(self):
        self.selections = []

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self.selections.append(find_trady_model(model).current_selection())


def main(out: str) -> None:
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        num_train_epochs=10,
        learning_rate=3e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
        dataloader_num_workers=0,
    )
    # coverage=1.0 keeps every layer: the RGN ranking keeps 3 of 19 here, too few to learn the toy task in 40 steps
    # TraDy's uniform re-draws (the paper's selection): the run checks that every rank draws the same channels at
    # every epoch and that they learn this toy task within 10 epochs (calibrated for uniform draws).
    config = TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.5, coverage=1.0, selection="trady")
    model = get_peft_model(tiny_bert(seed=0), config)
    data = toy_dataset(32)
    collator = PadOnlyCollator()
    recorder = Recorder()
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[TraDyCallback(), recorder]
    )
    rank = dist.get_rank()
    # different calibration data on each rank
    calibrate(model, [collator([data[i] for i in range(8 * rank + 4 * b, 8 * rank + 4 * b + 4)]) for b in range(2)])
    trainer.train()
    tuner = find_trady_model(model)
    # The callback cannot calibrate under DDP (DDP registered the parameters before training begins): refused
    lazy = get_peft_model(tiny_bert(seed=0), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.5))
    lazy_args = TrainingArguments(
        output_dir=os.path.join(out, "lazy"),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    try:
        Trainer(
            model=lazy, args=lazy_args, train_dataset=data, data_collator=collator, callbacks=[TraDyCallback()]
        ).train()
        refusal = None
    except RuntimeError as error:
        refusal = str(error)
    # A peak budget: each rank measures plans on its own batch (rank 1's carries 8 more padding tokens, so its peaks
    # differ), and both must train rank 0's plan, whose size is the flat parameter's.
    batch = collator([data[i] for i in range(4)])
    if rank == 1:
        batch = {
            k: torch.cat([v, torch.zeros(v.shape[0], 8, dtype=v.dtype)], dim=1) if v.dim() == 2 else v
            for k, v in batch.items()
        }
    full = step_memory(tiny_bert(seed=0), batch, method="full").peak_bytes
    planned = get_peft_model(tiny_bert(seed=0), TraDyConfig(task_type="SEQ_CLS", peak_bytes=int(0.9 * full)))
    calibrate(planned, [batch])
    plan = planned.peft_config["default"].peak_plan
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save(
        {
            "world_size": dist.get_world_size(),
            "selections": recorder.selections,
            "selected_layers": model.peft_config["default"].selected_layers,
            "capacity": tuner.trady_flat["default"].numel(),
            "state": state,
            "refusal": refusal,
            "peak_plan": {k: v for k, v in plan.items() if k != "trials"},
            "peak_capacity": find_trady_model(planned).trady_flat["default"].numel(),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
    finish_distributed()

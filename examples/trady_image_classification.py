"""TraDy on image classification: a small vision model fine-tuned under a hard memory budget on scikit-learn's
digits (embedded).

TraDy fine-tunes a *pretrained* network. No pretrained vision weights ship with this project, so by default the
script first pretrains the model in full on the digits 0-4 only (``--pretrain_epochs``), then fine-tunes it with
TraDy on all ten digits: the new classes must be learnt through the few re-sampled channels (and the head). Pass
``--model_name_or_path`` to start from a real checkpoint instead (e.g. microsoft/resnet-18).

Sparse channel updates move few weights: use about ten times full fine-tuning's learning rate. The paper trains with
plain SGD (``--optim sgd``).

    python examples/trady_image_classification.py --arch resnet --output_dir outputs/trady_digits \\
        --num_train_epochs 4 --learning_rate 2e-3 --per_device_train_batch_size 64
    torchrun --nproc_per_node 2 examples/trady_image_classification.py --arch mobilenet_v2 \\
        --output_dir outputs/trady_ddp --max_steps 20
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
from peft import get_peft_model
from small_vision_models import small_model
from transformers import (
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from hf_collapse.data import load_digits_images
from hf_collapse.trady import TraDyCallback, TraDyConfig, calibrate, find_trady_model, memory_report


@dataclass
class ScriptArguments:
    arch: str = field(default="resnet", metadata={"choices": ["resnet", "mobilenet_v2", "swin", "vit"]})
    model_name_or_path: str = field(default="", metadata={"help": "A checkpoint to start from (skips pretraining)."})
    image_size: int = 32
    pretrain_epochs: float = field(default=3.0, metadata={"help": "Full training on digits 0-4 before TraDy."})
    pretrain_learning_rate: float = 2e-3
    budget_ratio: float = field(default=0.05, metadata={"help": "Budget as a fraction of updating every channel."})
    selection: str = field(
        default="trady",
        metadata={
            "help": "trady | static_topk_random | full_random | det_rgn",
            "choices": ["trady", "static_topk_random", "full_random", "det_rgn"],
        },
    )
    coverage: float = 0.97
    max_depth: int | None = None
    calibration_batches: int = 4


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    data = load_digits_images(image_size=script.image_size)
    labels = data["train"].features["label"].names
    if script.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            script.model_name_or_path, num_labels=len(labels), ignore_mismatched_sizes=True
        )
    else:
        model = small_model(script.arch, script.image_size, len(labels))
        if script.pretrain_epochs > 0:
            first_half = data["train"].filter(lambda row: int(row["label"]) < 5)
            pretrain_args = TrainingArguments(
                os.path.join(args.output_dir, "pretrain"),
                num_train_epochs=script.pretrain_epochs,
                learning_rate=script.pretrain_learning_rate,
                per_device_train_batch_size=args.per_device_train_batch_size,
                use_cpu=args.use_cpu,
                report_to=[],
                save_strategy="no",
                disable_tqdm=args.disable_tqdm,
                seed=args.seed,
                logging_steps=args.logging_steps,
            )
            Trainer(model=model, args=pretrain_args, train_dataset=first_half).train()

    head = ["classifier"]
    model = get_peft_model(
        model,
        TraDyConfig(
            budget_ratio=script.budget_ratio,
            selection=script.selection,
            coverage=script.coverage,
            max_depth=script.max_depth,
            calibration_batches=script.calibration_batches,
            seed=args.seed,
            modules_to_save=head,
        ),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        compute_metrics=accuracy,
        callbacks=[TraDyCallback()],
    )
    summary = calibrate(model, trainer.get_train_dataloader())
    report = memory_report(model, next(iter(trainer.get_train_dataloader())))
    tuner = find_trady_model(model)
    if trainer.is_world_process_zero():
        print(
            f"TraDy ({script.arch}): {len(summary['selected_layers'])} of {len(tuner.trady_layers())} layers kept, "
            f"budget {summary['budget_elements']:.0f} elements, {tuner.budget_summary()['channels']} channels"
        )
        print(report.to_markdown())
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"accuracy: {metrics['eval_accuracy']:.4f}")
        model.save_pretrained(os.path.join(args.output_dir, "adapter"))
        model.merge_and_unload().save_pretrained(os.path.join(args.output_dir, "merged"))
        with open(os.path.join(args.output_dir, "trady_report.json"), "w") as handle:
            json.dump(
                {
                    "eval": metrics,
                    "calibration": summary,
                    "memory": report.to_dict(),
                    "selection_history": tuner.selection_history(),
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()

"""TraDy on text classification: fine-tune a pretrained BERT-family model under a hard memory budget.

Default: the real pretrained all-MiniLM-L6-v2 on the embedded dialog-topic task (minutes on a CPU). The a priori
step ranks the layers on a few training batches, then the updated input channels are re-sampled at every epoch;
only those channels store activations and get weight gradients.

Sparse channel updates move few weights: at a 5% budget use about ten times full fine-tuning's learning rate
(e.g. 5e-4 with AdamW where full fine-tuning uses 5e-5). The paper trains with plain SGD (--optim sgd).

    python examples/trady_text_classification.py --output_dir outputs/trady_text --num_train_epochs 5 \\
        --learning_rate 5e-4 --per_device_train_batch_size 32
    torchrun --nproc_per_node 2 examples/trady_text_classification.py --output_dir outputs/trady_ddp --max_steps 20
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \\
        examples/trady_text_classification.py --model_name_or_path FacebookAI/roberta-base --dataset_name ag_news \\
        --output_dir outputs/roberta --num_train_epochs 3 --budget_ratio 0.05 --learning_rate 3e-4
"""

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from hf_collapse.data import embedded_model_path, load_dialog_topics
from hf_collapse.trady import TraDyCallback, TraDyConfig, calibrate, find_trady_model, memory_report

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Default: the embedded all-MiniLM-L6-v2."})
    dataset_name: str = field(
        default="", metadata={"help": "A datasets name with text/label columns. Default: the embedded dialog topics."}
    )
    max_length: int = 32
    budget_ratio: float = field(default=0.05, metadata={"help": "Budget as a fraction of updating every channel."})
    selection: str = field(
        default="trady",
        metadata={
            "help": "trady | static_topk_random | full_random | det_rgn",
            "choices": ["trady", "static_topk_random", "full_random", "det_rgn"],
        },
    )
    coverage: float = field(default=0.97, metadata={"help": "Fraction of the cumulative RGN the kept layers cover."})
    max_depth: int | None = field(default=None, metadata={"help": "Only the last N target layers may train."})
    calibration_batches: int = field(default=4, metadata={"help": "Batches of the a priori layer ranking."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    if args.learning_rate <= 5e-5:
        logger.warning(
            "learning_rate=%s: sparse channel updates usually need ~10x full fine-tuning's rate "
            "(e.g. --learning_rate 5e-4)",
            args.learning_rate,
        )
    data = load_dataset(script.dataset_name) if script.dataset_name else load_dialog_topics()
    if script.max_train_samples:
        data["train"] = (
            data["train"].shuffle(seed=args.seed).select(range(min(script.max_train_samples, len(data["train"]))))
        )
    eval_split = "test" if "test" in data else "validation"
    if script.max_eval_samples:
        data[eval_split] = data[eval_split].select(range(min(script.max_eval_samples, len(data[eval_split]))))
    labels = data["train"].features["label"].names
    source = script.model_name_or_path or embedded_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    data = data.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=script.max_length),
        batched=True,
        remove_columns=["text"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )

    config = TraDyConfig(
        task_type="SEQ_CLS",
        budget_ratio=script.budget_ratio,
        selection=script.selection,
        coverage=script.coverage,
        max_depth=script.max_depth,
        calibration_batches=script.calibration_batches,
        seed=args.seed,
    )
    model = get_peft_model(model, config)

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data[eval_split],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[TraDyCallback()],
    )
    # The a priori step, before the optimizer exists (under DDP its measurements are summed over the ranks).
    summary = calibrate(model, trainer.get_train_dataloader())
    batch = next(iter(trainer.get_train_dataloader()))
    report = memory_report(model, batch)
    tuner = find_trady_model(model)
    if trainer.is_world_process_zero():
        print(
            f"TraDy: {len(summary['selected_layers'])} of {len(tuner.trady_layers())} layers kept, "
            f"budget {summary['budget_elements']:.0f} elements, {tuner.budget_summary()['channels']} channels"
        )
        print(report.to_markdown())
        model.print_trainable_parameters()

    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"accuracy: {metrics['eval_accuracy']:.4f}")
        model.save_pretrained(os.path.join(args.output_dir, "adapter"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "adapter"))
        merged = model.merge_and_unload()
        merged.save_pretrained(os.path.join(args.output_dir, "merged"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
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

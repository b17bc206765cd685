"""LaCoOT on text classification: fine-tune a BERT/RoBERTa-family model with the MSW penalty, then remove the
blocks it made removable, within an accuracy budget.

Default: the real pretrained all-MiniLM-L6-v2 on the embedded dialog-topic task (minutes on a CPU).

    python examples/lacoot_text_classification.py --output_dir outputs/text --max_steps 20
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \\
        examples/lacoot_text_classification.py --model_name_or_path FacebookAI/roberta-base --dataset_name ag_news \\
        --output_dir outputs/roberta --num_train_epochs 3 --msw_weight 0.1
"""

from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, HfArgumentParser

import hf_collapse
from hf_collapse.data import embedded_model_path, load_dialog_topics


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Default: the embedded all-MiniLM-L6-v2."})
    dataset_name: str = field(
        default="", metadata={"help": "A datasets name with text/label columns. Default: the embedded dialog topics."}
    )
    max_length: int = 64
    max_metric_delta: float = field(default=0.02, metadata={"help": "Accuracy the collapse may cost."})


def main():
    script, args = HfArgumentParser((ScriptArguments, hf_collapse.LaCoOTArguments)).parse_args_into_dataclasses()
    data = load_dataset(script.dataset_name) if script.dataset_name else load_dialog_topics()
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

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = hf_collapse.LaCoOTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    trainer.train()

    # Every rank collapses (deterministically); only the main process writes.
    collapsed, report = trainer.collapse(max_metric_delta=script.max_metric_delta)
    if trainer.is_world_process_zero():
        print(report.to_markdown())
        collapsed.save_pretrained(f"{args.output_dir}/collapsed")
        tokenizer.save_pretrained(f"{args.output_dir}/collapsed")
        report.save(f"{args.output_dir}/report")


if __name__ == "__main__":
    main()

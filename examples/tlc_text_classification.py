"""TLC on text classification: fine-tune a RoBERTa/BERT-family model, then collapse the MLP activations that
its pre-activation statistics show to be (mostly) ON or OFF, fusing the linear maps that become adjacent.

Default: the real pretrained all-MiniLM-L6-v2 on the embedded dialog-topic task. RoBERTa works the same:

    python examples/tlc_text_classification.py --output_dir outputs/tlc-text --max_steps 30
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/tlc_text_classification.py \\
        --model_name_or_path FacebookAI/roberta-base --output_dir outputs/tlc-roberta --num_train_epochs 3

The compress loop writes its progress after every step; an interrupted run continues with the same command plus
``--resume_from outputs/tlc-text/tlc_progress``.
"""

from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import hf_collapse
from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Default: the embedded all-MiniLM-L6-v2."})
    num_units: int = 3
    finetune_steps: int = 20
    max_metric_delta: float | None = None
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Continue an interrupted compress run from its progress folder (<output_dir>/tlc_progress)."},
    )


def main():
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    source = script.model_name_or_path or embedded_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    raw = load_dialog_topics()
    data = tokenize_text_dataset(raw, tokenizer, max_length=64)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(raw["train"].features["label"].names)
    )
    collator = DataCollatorWithPadding(tokenizer)

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    Trainer(model=model, args=args, train_dataset=data["train"], data_collator=collator).train()
    config = hf_collapse.TLCConfig(
        num_units=script.num_units, finetune_steps=script.finetune_steps, max_metric_delta=script.max_metric_delta
    )
    compressed, report = hf_collapse.tlc.compress(
        model,
        config,
        data["train"],
        data["test"],
        args,
        data_collator=collator,
        compute_metrics=accuracy,
        resume_from=script.resume_from,
    )
    if args.process_index == 0:
        print(report.to_markdown())
        compressed.save_pretrained(f"{args.output_dir}/compressed")  # reload with hf_collapse.AutoCollapsedModel
        tokenizer.save_pretrained(f"{args.output_dir}/compressed")
        report.save(f"{args.output_dir}/report")


if __name__ == "__main__":
    main()

"""TLC on image classification: a Swin (or ResNet / MobileNetV2, whose statistics come from BatchNorm with no
data) trained on scikit-learn's digits, then its activation layers collapsed and fused.

    python examples/tlc_image_classification.py --arch swin --output_dir outputs/tlc-swin --max_steps 30
"""

from dataclasses import dataclass, field

import numpy as np
from small_vision_models import small_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_collapse
from hf_collapse.data import load_digits_images


@dataclass
class ScriptArguments:
    arch: str = field(default="swin", metadata={"choices": ["swin", "resnet", "mobilenet_v2"]})
    image_size: int = 32
    num_units: int = 3
    finetune_steps: int = 20
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Continue an interrupted compress run from its progress folder (<output_dir>/tlc_progress)."},
    )


def main():
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    data = load_digits_images(image_size=script.image_size)
    model = small_model(script.arch, script.image_size, 10)

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    Trainer(model=model, args=args, train_dataset=data["train"]).train()
    config = hf_collapse.TLCConfig(num_units=script.num_units, finetune_steps=script.finetune_steps)
    compressed, report = hf_collapse.tlc.compress(
        model, config, data["train"], data["test"], args, compute_metrics=accuracy, resume_from=script.resume_from
    )
    if args.process_index == 0:
        print(report.to_markdown())
        compressed.save_pretrained(f"{args.output_dir}/compressed")
        report.save(f"{args.output_dir}/report")


if __name__ == "__main__":
    main()

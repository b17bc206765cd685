"""LaCoOT on image classification: Swin, ResNet or MobileNetV2 on scikit-learn's digits (embedded), trained
with the MSW penalty, then collapsed within an accuracy budget.

No pretrained vision weights are needed: a small model is built from its config (or pass
--model_name_or_path to start from a checkpoint, e.g. microsoft/swin-tiny-patch4-window7-224).

    python examples/lacoot_image_classification.py --arch resnet --output_dir outputs/digits --max_steps 30
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \\
        examples/lacoot_image_classification.py --arch swin --output_dir outputs/swin --num_train_epochs 10
"""

from dataclasses import dataclass, field

import numpy as np
from small_vision_models import small_model
from transformers import AutoModelForImageClassification, HfArgumentParser

import hf_collapse
from hf_collapse.data import load_digits_images


@dataclass
class ScriptArguments:
    arch: str = field(default="resnet", metadata={"choices": ["resnet", "swin", "mobilenet_v2"]})
    model_name_or_path: str = ""
    image_size: int = 32
    max_metric_delta: float = 0.02


def main():
    script, args = HfArgumentParser((ScriptArguments, hf_collapse.LaCoOTArguments)).parse_args_into_dataclasses()
    data = load_digits_images(image_size=script.image_size)
    labels = data["train"].features["label"].names
    if script.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            script.model_name_or_path, num_labels=len(labels), ignore_mismatched_sizes=True
        )
    else:
        model = small_model(script.arch, script.image_size, len(labels))

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = hf_collapse.LaCoOTTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"], compute_metrics=accuracy
    )
    trainer.train()
    collapsed, report = trainer.collapse(max_metric_delta=script.max_metric_delta)
    if trainer.is_world_process_zero():
        print(report.to_markdown())
        collapsed.save_pretrained(f"{args.output_dir}/collapsed")
        report.save(f"{args.output_dir}/report")


if __name__ == "__main__":
    main()

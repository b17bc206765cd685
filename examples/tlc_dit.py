"""TLC on a diffusion transformer: a class-conditional diffusers DiT with GELU feed-forwards learns to denoise
scikit-learn's digits; TLC then collapses its feed-forward activations (ranked by the denoising-loss gap) and
fuses them. (GEGLU feed-forwards, as in Stable Diffusion's UNet, are refused: a linearized gate is bilinear.)

    python examples/tlc_dit.py --output_dir outputs/tlc-dit --max_steps 40
"""

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from lacoot_dit import DenoisingCollator, denoising_loss
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_collapse
from hf_collapse.data import load_digits_images


@dataclass
class ScriptArguments:
    image_size: int = 16
    num_layers: int = 4
    num_units: int = 2
    finetune_steps: int = 10
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Continue an interrupted compress run from its progress folder (<output_dir>/tlc_progress)."},
    )


def main():
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    args.remove_unused_columns = False
    args.label_names = ["labels"]
    data = load_digits_images(image_size=script.image_size, num_channels=1)
    torch.manual_seed(args.seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        num_layers=script.num_layers,
        sample_size=script.image_size,
        patch_size=2,
        num_embeds_ada_norm=10,
        activation_fn="gelu",
    )
    collator = DenoisingCollator(DDPMScheduler(num_train_timesteps=1000))
    Trainer(
        model=model, args=args, train_dataset=data["train"], data_collator=collator, compute_loss_func=denoising_loss
    ).train()
    config = hf_collapse.TLCConfig(num_units=script.num_units, finetune_steps=script.finetune_steps)
    # No eval dataset: the metric is the denoising loss on the calibration batches.
    compressed, report = hf_collapse.tlc.compress(
        model,
        config,
        data["train"],
        None,
        args,
        data_collator=collator,
        compute_loss_func=denoising_loss,
        resume_from=script.resume_from,
    )
    if args.process_index == 0:
        print(report.to_markdown())
        compressed.save_pretrained(f"{args.output_dir}/compressed")
        report.save(f"{args.output_dir}/report")


if __name__ == "__main__":
    main()

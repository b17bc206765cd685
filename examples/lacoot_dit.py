"""LaCoOT on a diffusion transformer: a class-conditional diffusers DiT learns to denoise scikit-learn's digits
with the MSW penalty on its transformer blocks added to the denoising loss; the blocks with the smallest MSW
are then removed, and the denoising loss on held-out data is measured before and after.

    python examples/lacoot_dit.py --output_dir outputs/dit --max_steps 40
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/lacoot_dit.py \\
        --output_dir outputs/dit --num_train_epochs 50 --num_layers 12
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from transformers import HfArgumentParser

import hf_collapse
from hf_collapse.data import load_digits_images


@dataclass
class ScriptArguments:
    image_size: int = 16
    num_layers: int = 6
    num_units: int = 2  # blocks to remove
    seed_eval_noise: int = 1234


class DenoisingCollator:
    """Noises clean images at random timesteps; the target is the noise. Held-out examples carry fixed noise
    and timesteps (columns ``noise`` / ``timestep``), so every evaluation sees the same problems."""

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler

    def __call__(self, features):
        images = torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])
        if "noise" in features[0]:
            noise = torch.stack([torch.as_tensor(f["noise"]) for f in features])
            timesteps = torch.tensor([int(f["timestep"]) for f in features])
        else:
            noise = torch.randn_like(images)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(features),))
        return {
            "hidden_states": self.scheduler.add_noise(images, noise, timesteps),
            "timestep": timesteps,
            "class_labels": torch.tensor([int(f["label"]) for f in features]),
            "labels": noise,
        }


def denoising_loss(outputs, labels, num_items_in_batch=None):
    return F.mse_loss(outputs.sample, labels)


def main():
    script, args = HfArgumentParser((ScriptArguments, hf_collapse.LaCoOTArguments)).parse_args_into_dataclasses()
    args.remove_unused_columns = False
    args.label_names = ["labels"]
    args.metric_for_best_model, args.greater_is_better = "loss", False
    data = load_digits_images(image_size=script.image_size, num_channels=1)
    generator = torch.Generator().manual_seed(script.seed_eval_noise)
    test = data["test"]
    test = test.add_column(
        "noise", torch.randn(len(test), 1, script.image_size, script.image_size, generator=generator).tolist()
    )
    test = test.add_column("timestep", torch.randint(0, 1000, (len(test),), generator=generator).tolist())

    torch.manual_seed(args.seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        num_layers=script.num_layers,
        sample_size=script.image_size,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    trainer = hf_collapse.LaCoOTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=test,
        data_collator=DenoisingCollator(DDPMScheduler(num_train_timesteps=1000)),
        compute_loss_func=denoising_loss,
    )
    trainer.train()
    collapsed, report = trainer.collapse(num_units=script.num_units)
    if trainer.is_world_process_zero():
        print(report.to_markdown())
        before, after = report.summary()["metric_before"], report.summary()["metric_after"]
        print(f"held-out denoising loss: {before:.4f} -> {after:.4f} after removing {script.num_units} blocks")
        collapsed.save_pretrained(f"{args.output_dir}/collapsed")
        report.save(f"{args.output_dir}/report")


if __name__ == "__main__":
    main()

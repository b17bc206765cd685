"""LaCoOT in your own training loop: ``MSWPenalty`` with accelerate (the loop diffusers' training scripts use), then
score the blocks, collapse the model and save it. Without accelerate the loop is the same, minus ``prepare`` and
with ``loss.backward()``.

Default: the real pretrained all-MiniLM-L6-v2 on the embedded dialog-topic task (well under a minute on a CPU).

    python examples/lacoot_custom_loop.py --output_dir outputs/custom_loop --max_steps 20
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml \\
        examples/lacoot_custom_loop.py --output_dir outputs/custom_loop_fsdp --max_steps 200
    # 2-process DDP on CPU: ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/lacoot_custom_loop.py ...

The three LaCoOT lines are marked ``# LaCoOT``: create the penalty before ``accelerator.prepare`` (its hooks stay on
the model's own modules under DDP and FSDP2), run the forward pass inside ``penalty.capture``, add
``λ * penalty()`` to the loss.
"""

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hf_collapse
from hf_collapse.data import embedded_model_path, load_dialog_topics
from hf_collapse.distributed import unsharded_copy


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default="", help="Default: the embedded all-MiniLM-L6-v2.")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--msw_weight", type=float, default=0.5, help="λ, the weight of the MSW penalty.")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--num_units", type=int, default=2, help="How many blocks to remove.")
    parser.add_argument("--eval_examples", type=int, default=128, help="Held-out examples for scores and accuracy.")
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


@torch.no_grad()
def accuracy(model, loader, device) -> float:
    model.eval()
    correct = seen = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
        seen += len(labels)
    return correct / seen


def main():
    args = parse_args()
    accelerator = Accelerator()
    set_seed(args.seed)

    data = load_dialog_topics()
    labels = data["train"].features["label"].names
    source = args.model_name_or_path or embedded_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source)
    data = data.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["text"],
    )
    held_out = data["test"].select(range(min(args.eval_examples, len(data["test"]))))
    collator = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collator)
    eval_loader = DataLoader(held_out, batch_size=64, collate_fn=collator)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels))

    penalty = hf_collapse.MSWPenalty(model, seed=args.seed)  # LaCoOT: before prepare
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, train_loader, scoring_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    model.train()
    step = 0
    while step < args.max_steps:
        for batch in train_loader:
            with penalty.capture(inputs=batch):  # LaCoOT: padding is left out of the distances
                task_loss = model(**batch).loss
            msw = penalty()
            accelerator.backward(task_loss + args.msw_weight * msw)  # LaCoOT: task loss + λ · MSW
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.log_every == 0 or step == args.max_steps:
                accelerator.print(
                    json.dumps(
                        {
                            "step": step,
                            "loss": round(float(task_loss.detach()), 4),
                            "msw_total": round(float(msw.detach()), 4),
                            **{f"msw/{k}": round(v, 4) for k, v in penalty.last_values().items()},
                        }
                    )
                )
            if step >= args.max_steps:
                break
    penalty.remove()

    # Score every block on held-out data (every rank scores its shard; the scores are pooled), then gather the model
    # (FSDP2-sharded or not) into a plain copy on the main process, which collapses and saves.
    model.eval()
    scores = hf_collapse.score_blocks(accelerator.unwrap_model(model), scoring_loader, method="msw", progress=False)
    full = unsharded_copy(accelerator.unwrap_model(model))
    if full is not None:
        full.to(accelerator.device)
        collapsed, report = hf_collapse.collapse(
            full,
            scores,
            num_units=args.num_units,
            eval_fn=lambda m: accuracy(m, eval_loader, accelerator.device),
            metric_name="accuracy",
            method="LaCoOT",
            latency_repeats=3,
            progress=False,
        )
        print(report.to_markdown())
        collapsed.save_pretrained(f"{args.output_dir}/collapsed")
        tokenizer.save_pretrained(f"{args.output_dir}/collapsed")
        report.save(f"{args.output_dir}/report")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

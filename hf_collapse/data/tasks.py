"""Ready-to-train tasks from a model name and a dataset name: what the commands and the README's snippets start from.

:func:`prepare_task` turns ``(model, dataset)`` into a model with the right head, tokenized (or image) splits, its
processor and collator: a classification task on labelled data, or a causal-LM task on text cut into windows.
:func:`example_text_task` is the embedded MiniLM on the embedded dialog topics, cut to a size that trains in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .embedded_datasets import is_embedded_dataset, load_embedded_dataset, tokenize_text_dataset
from .embedded_models import embedded_model_path, is_embedded
from .sources import DATA_FILE_SUFFIXES
from .text import lm_windows

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "TASKS",
    "ExampleTask",
    "Task",
    "accuracy",
    "example_text_task",
    "load_data_source",
    "model_source",
    "prepare_task",
    "resolve_task",
    "text_splits",
]

#: Kinds of task: ``auto`` picks ``causal_lm`` for a causal LM (its config names a ``...ForCausalLM`` or
#: ``...LMHeadModel`` architecture), ``classification`` otherwise.
TASKS = ("auto", "classification", "causal_lm")


class Task(NamedTuple):
    """A model ready to train on a dataset: ``model, data, processor, collator = prepare_task(...)``."""

    model: Any  #: the model, with a classification head of the dataset's labels when the task is classification
    data: Any  #: ``datasets.DatasetDict`` with ``"train"`` and ``"test"`` (tokenized, images, or causal-LM windows)
    processor: Any  #: the tokenizer (``None`` for images)
    collator: Any  #: what batches the examples (pads token sequences)


def model_source(name: str) -> str:
    """The folder of an embedded model (``"minilm"``, ``"smollm2"``), or ``name`` itself (a folder or a Hub id)."""
    return str(embedded_model_path(name)) if is_embedded(name) else name


def resolve_task(model: str, task: str = "auto") -> str:
    """``task``, with ``auto`` resolved from the model's config: ``causal_lm`` when its architecture is a causal LM
    (``...ForCausalLM``, ``...LMHeadModel``), else ``classification``."""
    if task != "auto":
        return task
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(model_source(model)), "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "causal_lm" if causal else "classification"


def _check_columns(name: str, columns: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(
            f"dataset {name!r} has no column {missing[0]!r} (its columns: {', '.join(columns)}); "
            "name the right ones with --text_column / --label_column"
        )


def load_data_source(name: str):
    """The splits of a dataset given on the command line: an embedded name, a local data file or folder (json,
    jsonl, csv, parquet; a single .txt file as lines of text), or a Hub dataset name."""
    import datasets

    if is_embedded_dataset(name):
        return load_embedded_dataset(name)
    path = Path(name)
    if not path.exists():
        return datasets.load_dataset(name)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in DATA_FILE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(DATA_FILE_SUFFIXES)} files in {path}")
    kind = {".jsonl": "json", ".txt": "text"}.get(files[0].suffix, files[0].suffix.lstrip("."))
    return datasets.load_dataset(kind, data_files=[str(f) for f in files])


def text_splits(name: str, text_column: str = "text") -> tuple[list[str], list[str]]:
    """Training text and held-out text (the ``test`` or ``validation`` split, else 10% of ``train``) of a dataset
    given on the command line, for causal-LM tasks."""
    data = load_data_source(name)
    if text_column not in data["train"].column_names:
        raise ValueError(
            f"dataset {name!r} has no column {text_column!r} (its columns: "
            f"{', '.join(data['train'].column_names)}); name it with --text_column"
        )
    held_out = next((data[s] for s in ("test", "validation") if s in data), None)
    if held_out is None:
        split = data["train"].train_test_split(test_size=0.1, seed=0)
        data, held_out = {"train": split["train"]}, split["test"]
    return list(data["train"][text_column]), list(held_out[text_column])


def classification_splits(name: str, label_column: str, text_column: str):
    import datasets

    if is_embedded_dataset(name):
        return load_embedded_dataset(name)
    loaded = load_data_source(name)
    columns = loaded["train"].column_names
    _check_columns(name, columns, [label_column] + ([] if "pixel_values" in columns else [text_column]))
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


def prepare_task(
    model: str = "minilm",
    dataset: str = "dialog_topics",
    *,
    task: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 64,
    eval_windows: int = 64,
    train_windows: int | None = None,
) -> Task:
    """Load the data, the model, its processor and collator for ``task`` (default: :func:`resolve_task`).

    Classification: the model gets a classification head of the right size; text columns are tokenized (at most
    ``max_length`` tokens), images come as ``pixel_values``. Causal LM: the text is cut into windows of ``max_length``
    tokens (:func:`hf_collapse.data.lm_windows`; at most ``train_windows`` for training, ``eval_windows`` held out),
    ``labels`` = ``input_ids``.

    Example::

        >>> model, data, tokenizer, collator = prepare_task("minilm", "dialog_topics", max_length=32)
        >>> sorted(data)
        ['test', 'train']
    """
    from transformers import (
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        default_data_collator,
    )

    source = model_source(model)
    if resolve_task(model, task) == "causal_lm":
        import datasets
        from transformers import AutoModelForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(source)
        train_text, held_out_text = text_splits(dataset, text_column)
        data = datasets.DatasetDict(
            train=lm_windows(train_text, tokenizer, max_length=max_length, max_windows=train_windows),
            test=lm_windows(held_out_text, tokenizer, max_length=max_length, max_windows=eval_windows),
        )
        return Task(AutoModelForCausalLM.from_pretrained(source), data, tokenizer, default_data_collator)
    data = classification_splits(dataset, label_column, text_column)
    if label_column != "label":
        data = data.rename_column(label_column, "label")
    labels = data["train"].features["label"].names
    label_maps = dict(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
    )
    if "pixel_values" in data["train"].column_names:
        classifier = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **label_maps)
        return Task(classifier, data, None, default_data_collator)
    processor = AutoTokenizer.from_pretrained(source)
    if text_column != "text":
        data = data.rename_column(text_column, "text")
    data = tokenize_text_dataset(data, processor, max_length=max_length)
    classifier = AutoModelForSequenceClassification.from_pretrained(source, **label_maps)
    return Task(classifier, data, processor, DataCollatorWithPadding(processor))


@dataclass
class ExampleTask:
    """A small, ready-to-train text classification task (see :func:`example_text_task`)."""

    model: Any  #: ``BertForSequenceClassification``: the pretrained MiniLM with a new head of ``len(labels)``
    tokenizer: Any  #: its tokenizer (pass it as ``processing_class``)
    train: datasets.Dataset  #: tokenized (``input_ids``, ``attention_mask``, ``token_type_ids``, ``label``)
    test: datasets.Dataset  #: tokenized like ``train``
    collator: Any  #: ``DataCollatorWithPadding``: examples have different lengths, so batches must be padded
    compute_metrics: Callable[[Any], dict[str, float]]  #: ``{"accuracy": ...}`` for ``Trainer(compute_metrics=)``
    labels: list[str]  #: the topic names, in label order


def example_text_task(
    train_size: int | None = 256, test_size: int | None = 128, max_length: int = 32, seed: int = 0
) -> ExampleTask:
    """The embedded MiniLM on the embedded ``dialog_topics`` task, tokenized, with its collator and metric: what
    the README's snippets start from. It is the task of ``hf-collapse lacoot`` / ``tlc`` (built by
    :func:`prepare_task`), cut to a size that trains in seconds on a CPU.

    Args:
        train_size: keep the first ``train_size`` training examples (the split is already shuffled); ``None``:
            all 1,486.
        test_size: the same for the test split; ``None``: all 372.
        max_length: the most tokens of an example.
        seed: seeds the new classification head, without touching the global random state: the same seed gives
            the same model.

    Returns:
        An :class:`ExampleTask` (``model``, ``tokenizer``, ``train``, ``test``, ``collator``, ``compute_metrics``,
        ``labels``).

    Example:
        >>> task = example_text_task(train_size=64, test_size=32)
        >>> len(task.train), len(task.test), type(task.model).__name__
        (64, 32, 'BertForSequenceClassification')
        >>> batch = task.collator([task.train[i] for i in range(4)])  # padded to the longest of the 4
        >>> batch["input_ids"].shape[0], batch["labels"].tolist() == task.train["label"][:4]
        (4, True)
    """
    import torch

    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and int(size) < 1:
            raise ValueError(f"{name} must be a positive number of examples or None (all), got {size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, data, tokenizer, collator = prepare_task("minilm", "dialog_topics", max_length=max_length)
    splits = {}
    for split, size in (("train", train_size), ("test", test_size)):
        splits[split] = data[split] if size is None else data[split].select(range(min(int(size), len(data[split]))))
    return ExampleTask(
        model=model,
        tokenizer=tokenizer,
        train=splits["train"],
        test=splits["test"],
        collator=collator,
        compute_metrics=accuracy,
        labels=list(data["train"].features["label"].names),
    )

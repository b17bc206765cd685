"""Language-modelling text: documents cut into fixed-length token windows (:func:`lm_windows`), and windows of
several corpora mixed (:func:`mixed_lm_windows`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..deprecation import renamed
from .embedded_datasets import quiet_datasets, require_package

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = ["lm_window_parts", "lm_windows", "mixed_lm_windows", "shuffle_windows"]


def lm_windows(
    texts: Iterable[str],
    tokenizer: Any,
    max_length: int = 128,
    max_windows: int | None = None,
    separator: str | None = "eos",
    *,
    window: int | None = None,
) -> datasets.Dataset:
    """Cut ``texts`` into consecutive, non-overlapping windows of exactly ``max_length`` tokens, for causal-LM
    perplexity, calibration or training.

    The texts are tokenized without special tokens and concatenated in order, each followed by the tokenizer's
    end-of-sequence token (``separator="eos"``; ``None``: nothing between texts), then cut into windows; the
    last, incomplete window is dropped. Every window is full, so there is no padding: ``attention_mask`` is all
    ones and ``labels`` equals ``input_ids`` (the model shifts them, as in ``transformers``'s causal LMs).

    Args:
        texts: the documents, e.g. ``load_bbc_news()["test"]["text"]``.
        tokenizer: a ``transformers`` tokenizer.
        max_length: tokens per window.
        max_windows: stop after this many windows (``None``: all); only the texts needed are tokenized.
        separator: ``"eos"`` or ``None``.
        window: the name of ``max_length`` in earlier versions (deprecated: a ``FutureWarning``).

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (each ``max_length`` long), in
        torch format: ``torch.utils.data.DataLoader(windows, batch_size=8)`` yields the batches that
        :func:`hf_collapse.metrics.perplexity` and ``Trainer`` take.

    Raises:
        ValueError: for a ``max_length`` below 2, a ``max_windows`` below 1, an unknown ``separator``, an ``"eos"``
            separator with a tokenizer that has no end-of-sequence token, or texts too short for one window.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from hf_collapse.data import embedded_model_path, load_bbc_news, lm_windows
        >>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
        >>> windows = lm_windows(load_bbc_news()["test"]["text"], tokenizer, max_length=64, max_windows=10)
        >>> len(windows), windows[0]["input_ids"].shape, bool(windows[0]["attention_mask"].all())
        (10, torch.Size([64]), True)
    """
    if window is not None:
        renamed("window", "max_length", "lm_windows")
        max_length = window
    datasets = require_package("datasets", "datasets", "lm_windows")
    window = int(max_length)
    if window < 2:
        raise ValueError(f"max_length must be at least 2 tokens (one input, one target), got {window}")
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
    with quiet_datasets():
        dataset = datasets.Dataset.from_dict(
            {"input_ids": windows, "attention_mask": [[1] * window for _ in windows], "labels": windows},
            features=datasets.Features(
                {name: datasets.Sequence(datasets.Value("int64")) for name in ("input_ids", "attention_mask", "labels")}
            ),
        )
    return dataset.with_format("torch")


def mixed_lm_windows(
    parts: Sequence[tuple[Iterable[str], int]], tokenizer: Any, max_length: int = 128, seed: int = 0
) -> datasets.Dataset:
    """Windows of several corpora in one shuffled dataset: ``parts`` is ``[(texts, windows), ...]``, each corpus cut
    by :func:`lm_windows` into (at most) that many windows. Healing on a mix keeps general text in view: replay
    against turning the model into a specialist of one corpus. A corpus too short for its count gives fewer windows:
    :func:`lm_window_parts` and :func:`shuffle_windows` give the windows of each part, to count them.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from hf_collapse.data import embedded_model_path, load_bbc_news, mixed_lm_windows
        >>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
        >>> news = load_bbc_news()   # with `load_wiki()["train"]["text"]` as the second part: news and general text
        >>> mixed = mixed_lm_windows([(news["train"]["text"], 6), (news["test"]["text"], 2)], tokenizer, max_length=32)
        >>> len(mixed), mixed[0]["input_ids"].shape
        (8, torch.Size([32]))
    """
    return shuffle_windows(lm_window_parts(parts, tokenizer, max_length=max_length), seed=seed)


def lm_window_parts(
    parts: Sequence[tuple[Iterable[str], int]], tokenizer: Any, max_length: int = 128
) -> list[datasets.Dataset]:
    """The windows of each part of ``parts`` (``[(texts, windows), ...]``, see :func:`mixed_lm_windows`), a part
    with a count of 0 left out."""
    pieces = [lm_windows(texts, tokenizer, max_length=max_length, max_windows=count) for texts, count in parts if count]
    if not pieces:
        raise ValueError("mixed_lm_windows needs at least one part with a positive number of windows")
    return pieces


def shuffle_windows(pieces: Sequence[datasets.Dataset], seed: int = 0) -> datasets.Dataset:
    """The windows of ``pieces`` (:func:`lm_window_parts`) in one dataset, shuffled with ``seed``."""
    datasets = require_package("datasets", "datasets", "mixed_lm_windows")
    with quiet_datasets():
        return datasets.concatenate_datasets(list(pieces)).shuffle(seed=seed).flatten_indices().with_format("torch")

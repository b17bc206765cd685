"""Text that two documents share: duplicates within a corpus, and held-out documents that overlap the training text.

Held-out text must share nothing with training text, or a held-out perplexity, accuracy or zero-shot task measures
memory rather than generalisation. Corpora repeat themselves: the BBC News corpus holds the same story under two
titles (a new headline over the same body), wire stories rewritten with a few words changed, follow-ups that quote
whole paragraphs. Two measures catch them, on lower-cased text with whitespace collapsed:

* **exact or same opening**: the same text, or the same first :data:`OPENING_CHARS` characters (a story re-filed with
  a different ending);
* **containment of word shingles**: the share of a document's runs of :data:`SHINGLE_WORDS` consecutive words that
  also occur in the other document, over the smaller of the two (a re-titled copy scores 1.0, a follow-up that quotes
  two paragraphs of a ten-paragraph story 0.2). A document shorter than a shingle is one shingle: itself.

:func:`drop_duplicates` keeps the first of every group of duplicates (containment >= 0.5) in a corpus;
:func:`disjoint_splits` then leaves out of each held-out split every document that shares more than a trace
(containment >= 0.2) with a split before it (train, then validation, then test), so that test text overlaps neither
training nor validation text.

Example::

    >>> from hf_collapse.data.overlap import drop_duplicates, overlapping
    >>> drop_duplicates(["Rates held at 4.75%. The Bank of England left rates on hold today.",
    ...                  "Bank holds rates at 4.75%. The Bank of England left rates on hold today.", "Other news."],
    ...                 shingle_words=4)
    [0, 2]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

__all__ = [
    "DUPLICATE_CONTAINMENT",
    "OPENING_CHARS",
    "OVERLAP_CONTAINMENT",
    "SHINGLE_WORDS",
    "ShingleIndex",
    "disjoint_splits",
    "drop_duplicates",
    "normalize",
    "overlapping",
    "shingles",
]

#: Words per shingle: 8 consecutive words rarely repeat by chance in prose, but a shared sentence always does.
SHINGLE_WORDS = 8
#: Characters of the opening that make two documents one (a re-filed story keeps its first lines).
OPENING_CHARS = 200
#: Containment at or above which two documents are copies of one another (one is kept).
DUPLICATE_CONTAINMENT = 0.5
#: Containment at or above which a held-out document overlaps the training text (it is left out of its split).
OVERLAP_CONTAINMENT = 0.2
#: A shingle found in more documents than this is boilerplate ("Listen to the full interview on Sport on Five"),
#: not shared content: it does not count (and keeps the index small).
_COMMON_SHINGLE_DOCUMENTS = 20


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed to single spaces."""
    return " ".join(text.lower().split())


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[int]:
    """The runs of ``size`` consecutive words of the normalized text (the whole text when shorter), hashed (a hash
    stays the same within one process, which is all an index needs)."""
    words = normalize(text).split()
    if len(words) <= size:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i : i + size])) for i in range(len(words) - size + 1)}


class ShingleIndex:
    """Documents indexed by their shingles and openings, to find the indexed document a new one overlaps most."""

    def __init__(self, shingle_words: int = SHINGLE_WORDS):
        self.shingle_words = shingle_words
        self._sizes: list[int] = []
        self._by_shingle: defaultdict[int, list[int]] = defaultdict(list)
        self._exact: set[str] = set()
        self._openings: set[str] = set()

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, text: str) -> None:
        normalized = normalize(text)
        self._exact.add(normalized)
        if len(normalized) >= OPENING_CHARS:
            self._openings.add(normalized[:OPENING_CHARS])
        found = shingles(normalized, self.shingle_words)
        document = len(self._sizes)
        for shingle in found:
            self._by_shingle[shingle].append(document)
        self._sizes.append(len(found))

    def containment(self, text: str) -> float:
        """The largest containment of ``text`` and an indexed document (1.0 for an exact copy or the same opening)."""
        normalized = normalize(text)
        if normalized in self._exact or (
            len(normalized) >= OPENING_CHARS and normalized[:OPENING_CHARS] in self._openings
        ):
            return 1.0
        found = shingles(normalized, self.shingle_words)
        shared: Counter[int] = Counter()
        for shingle in found:
            documents = self._by_shingle.get(shingle, ())
            if len(documents) <= _COMMON_SHINGLE_DOCUMENTS:
                shared.update(documents)
        return max((count / max(min(len(found), self._sizes[i]), 1) for i, count in shared.items()), default=0.0)


def drop_duplicates(
    texts: Sequence[str], threshold: float = DUPLICATE_CONTAINMENT, shingle_words: int = SHINGLE_WORDS
) -> list[int]:
    """The indices of ``texts`` to keep: each text unless it duplicates one kept before it (same normalized text,
    same opening, or containment >= ``threshold``)."""
    index, kept = ShingleIndex(shingle_words), []
    for i, text in enumerate(texts):
        if index.containment(text) < threshold:
            kept.append(i)
            index.add(text)
    return kept


def overlapping(held_out: Sequence[str], reference: Sequence[str], threshold: float = OVERLAP_CONTAINMENT) -> list[int]:
    """The indices of ``held_out`` texts that overlap some ``reference`` text (containment >= ``threshold``)."""
    index = ShingleIndex()
    for text in reference:
        index.add(text)
    return [i for i, text in enumerate(held_out) if index.containment(text) >= threshold]


def disjoint_splits(splits, text_column: str = "text", threshold: float = OVERLAP_CONTAINMENT):
    """``splits`` (a ``datasets.DatasetDict``) with every document of a held-out split that overlaps an earlier split
    left out: ``"validation"`` against ``"train"``, ``"test"`` against both. Returns ``(splits, dropped)`` where
    ``dropped`` is ``{split: number of documents left out}``."""
    import datasets

    order = [name for name in ("train", "validation", "test") if name in splits]
    order += [name for name in splits if name not in order]
    kept, dropped, index = {}, {}, ShingleIndex()
    for position, name in enumerate(order):
        split = splits[name]
        texts = list(split[text_column])
        if position:
            leaking = {i for i, text in enumerate(texts) if index.containment(text) >= threshold}
            if leaking:
                split = split.select([i for i in range(len(texts)) if i not in leaking])
                texts = [t for i, t in enumerate(texts) if i not in leaking]
            dropped[name] = len(leaking)
        kept[name] = split
        for text in texts:
            index.add(text)
    return datasets.DatasetDict(kept), dropped

"""Local zero-shot tasks for lm-eval-harness, built from held-out documents: the field measures a pruned LLM by
zero-shot task accuracy, and these run offline, on text no calibration or healing saw.

Two kinds, each a JSON-lines file and an lm-eval task YAML beside it (``dataset_path: json`` with the absolute path
of the file, so the YAML loads from any working directory):

* **continuation** (``output_type: multiple_choice``, 4 choices, chance 0.25): the sentences before a point of a
  document, then its true next sentence against the sentences at the same point of three other documents, the
  same length within a factor of two (HellaSwag / StoryCloze's idea on the user's own kind of text);
* **last word** (``output_type: loglikelihood``, ``acc`` is whether the greedy continuation is the word, chance
  ~0): the passage before a sentence's last word, LAMBADA-style: only words that already occur in the passage, so
  that the context determines them.

Measured on SmolLM2-135M (original model, BBC News test articles): next sentence 0.665 acc_norm (0.51 acc) on 200
items, last word 0.52 on 197; a 5-way BBC topic question with a bare "Topic:" prompt was 0.28 (chance 0.20), so
it is not shipped.

Example::

    >>> from hf_collapse.data import load_embedded_dataset
    >>> from hf_collapse.data.zero_shot_tasks import write_tasks
    >>> news = load_embedded_dataset("bbc_news")
    >>> yamls = write_tasks("tasks", news["test"]["text"], prefix="bbc_news")
    >>> [path.name for path in yamls]
    ['bbc_news_continuation.yaml', 'bbc_news_last_word.yaml']
    >>> hf_collapse.lm_evaluation.zero_shot(model, tokenizer, yamls)   # lm-eval, on a model   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from ..lm_evaluation import LOCAL_TASK_KINDS
from .overlap import OVERLAP_CONTAINMENT, ShingleIndex

__all__ = ["TASK_KINDS", "continuation_items", "last_word_items", "sentences", "write_tasks"]

#: The kinds of task :func:`write_tasks` writes.
TASK_KINDS = LOCAL_TASK_KINDS

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"[A-Za-z]+")


def sentences(document: str) -> list[str]:
    """A document's sentences, in order: split at ``.``, ``!`` or ``?`` followed by space and a capital or digit,
    and at line breaks (titles and paragraphs); whitespace normalised."""
    found = []
    for paragraph in re.split(r"\n\s*", document.strip()):
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = " ".join(sentence.split())
            if sentence:
                found.append(sentence)
    return found


def _context(before: list[str], max_words: int) -> str:
    words = " ".join(before).split()
    return " ".join(words[-max_words:])


def _round_robin(count: int, num_items: int, rng: random.Random, make) -> list[dict]:
    """Items made by ``make(document index)`` (``None``: none from that document this time), visiting the documents
    in shuffled rounds, each once per round, until ``num_items`` are made or a whole round makes none: a short
    corpus gives several items per document."""
    order = list(range(count))
    rng.shuffle(order)
    items: list[dict] = []
    while len(items) < num_items:
        made = 0
        for index in order:
            if len(items) >= num_items:
                break
            item = make(index)
            if item is not None:
                items.append(item)
                made += 1
        if not made:
            break
    return items


def continuation_items(
    documents: Sequence[str], num_items: int = 200, *, max_context_words: int = 80, seed: int = 0
) -> list[dict]:
    """Multiple-choice items ``{"context", "choices", "label"}``: the passage before a sentence of a document, and that
    sentence among the sentences at the same position of three other documents (each between half and twice the
    true sentence's length). Documents with fewer than four sentences are skipped; a short corpus gives several
    items per document, never twice the same sentence.

    Raises:
        ValueError: when fewer than 5 documents have enough sentences.
    """
    rng = random.Random(seed)
    split = [s for s in (sentences(d) for d in documents) if len(s) >= 4]
    if len(split) < 5:
        raise ValueError(f"continuation items need 5 documents of 4 or more sentences; got {len(split)}")
    used: set[tuple[int, int]] = set()

    def make(index: int) -> dict | None:
        doc = split[index]
        free = [p for p in range(2, len(doc)) if (index, p) not in used]
        if not free:
            return None
        position = rng.choice(free)
        used.add((index, position))
        gold = doc[position]
        pool = [
            other[min(position, len(other) - 1)]
            for j, other in enumerate(split)
            if j != index and 0.5 <= len(other[min(position, len(other) - 1)]) / len(gold) <= 2.0
        ]
        pool = sorted(set(pool) - {gold})
        if len(pool) < 3:
            return None
        choices = [gold, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        return {
            "context": _context(doc[:position], max_context_words),
            "choices": choices,
            "label": choices.index(gold),
        }

    return _round_robin(len(split), num_items, rng, make)


def last_word_items(
    documents: Sequence[str], num_items: int = 200, *, max_context_words: int = 80, min_length: int = 4, seed: int = 0
) -> list[dict]:
    """Loglikelihood items ``{"context", "target"}``: the passage before the last word of a sentence, and that word
    (with its leading space). LAMBADA-style, only sentences whose last word (letters only, at least ``min_length``
    of them) already occurs earlier in the passage. A short corpus gives several items per document."""
    rng = random.Random(seed)
    candidates: list[list[dict]] = []
    for document in documents:
        doc, found = sentences(document), []
        for position in range(1, len(doc)):
            words = doc[position].split()
            if len(words) < 4:
                continue
            last = words[-1].rstrip(".!?\"')]")
            if not _WORD.fullmatch(last) or len(last) < min_length:
                continue
            context = _context([*doc[:position], " ".join(words[:-1])], max_context_words)
            if re.search(rf"\b{re.escape(last)}\b", " ".join(context.split()[:-1])):
                found.append({"context": context, "target": " " + last})
        rng.shuffle(found)
        candidates.append(found)
    return _round_robin(len(candidates), num_items, rng, lambda i: candidates[i].pop() if candidates[i] else None)


_YAML = {
    "continuation": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "{description}"
""",
    "last_word": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
  description: "{description}"
""",
}


def _item_text(item: dict) -> str:
    """An item's passage with its answer (the true next sentence, or the last word)."""
    answer = item["choices"][item["label"]] if "choices" in item else item["target"]
    return f"{item['context']} {answer}"


def write_tasks(
    folder: str | os.PathLike,
    documents: Sequence[str],
    *,
    prefix: str,
    kinds: Sequence[str] = TASK_KINDS,
    num_items: int = 200,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> list[Path]:
    """Write one lm-eval task per kind (``<prefix>_continuation``, ``<prefix>_last_word``) built from ``documents``
    (test documents: never the calibration, healing or validation text) into ``folder``: ``<task>.jsonl`` and
    ``<task>.yaml``. Returns the YAML paths, in ``kinds`` order, for :func:`hf_collapse.zero_shot.zero_shot`.

    ``exclude`` is the text the model was fitted on (training documents): an item whose passage and answer overlap
    it (:mod:`hf_collapse.data.overlap`) is left out, so that no item can be answered from memory.

    Raises:
        ValueError: for an unknown kind, a prefix that is not a plain name, or documents that give no items.
    """
    unknown = sorted(set(kinds) - set(TASK_KINDS))
    if unknown:
        raise ValueError(f"unknown task kind(s) {unknown}; accepted: {', '.join(TASK_KINDS)}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits and underscores (it names the lm-eval task)")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    build = {"continuation": continuation_items, "last_word": last_word_items}
    described = {
        "continuation": "the true next sentence of a held-out document among four",
        "last_word": "the last word of a sentence, greedy, LAMBADA-style",
    }
    index = ShingleIndex()
    for text in exclude:
        index.add(text)
    paths = []
    for kind in kinds:
        items = build[kind](documents, num_items, seed=seed)
        if len(index):
            items = [item for item in items if index.containment(_item_text(item)) < OVERLAP_CONTAINMENT]
        if not items:
            raise ValueError(f"the documents give no {kind} item")
        name = f"{prefix}_{kind}"
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        yaml = folder / f"{name}.yaml"
        yaml.write_text(_YAML[kind].format(name=name, data=json.dumps(str(data)), description=described[kind]))
        paths.append(yaml)
    return paths

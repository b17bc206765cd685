"""Held-out text shares nothing with training text: no embedded corpus has a document in two splits (checked with
datasketch's MinHash LSH, exact copies and shared openings, not with the library's own shingle index), splits carved
out of a user's data are separated the same way, each split says where it came from, and local zero-shot tasks keep no
item the model could answer from its training text."""

import json

import pytest

from hf_collapse.data import describe_split, load_embedded_dataset, load_splits
from hf_collapse.data.overlap import drop_duplicates, overlapping
from hf_collapse.data.zero_shot_tasks import write_tasks

TEXT_CORPORA = ["dialog_topics", "bbc_news", "wiki", "newsgroups"]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _grams(text: str, n: int = 5) -> set[str]:
    words = _normalized(text).split()
    return {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def _near_copies(held_out: list[str], earlier: list[str], threshold: float = 0.5) -> list[tuple[str, str, float]]:
    """Pairs (held-out, earlier) whose word 5-gram Jaccard is at least ``threshold``: candidates from datasketch's
    MinHash LSH, each confirmed by the exact Jaccard of the two sets."""
    from datasketch import MinHash, MinHashLSH

    def minhash(grams):
        signature = MinHash(num_perm=128, seed=1)
        signature.update_batch([g.encode() for g in grams])
        return signature

    lsh = MinHashLSH(threshold=threshold * 0.8, num_perm=128)  # a lower LSH threshold: no true pair is missed
    earlier_grams = [_grams(t) for t in earlier]
    for i, grams in enumerate(earlier_grams):
        lsh.insert(str(i), minhash(grams))
    found = []
    for text in held_out:
        grams = _grams(text)
        for key in lsh.query(minhash(grams)):
            other = earlier_grams[int(key)]
            jaccard = len(grams & other) / len(grams | other)
            if jaccard >= threshold:
                found.append((text[:80], earlier[int(key)][:80], round(jaccard, 3)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", TEXT_CORPORA)
def test_no_document_of_an_embedded_corpus_is_in_two_splits(name):
    splits = load_embedded_dataset(name)
    order = [s for s in ("train", "validation", "test") if s in splits]
    earlier: list[str] = []
    for split in order:
        texts = list(splits[split]["text"])
        if earlier:
            exact = {_normalized(t) for t in earlier}
            openings = {_normalized(t)[:200] for t in earlier if len(_normalized(t)) >= 200}
            assert not [t[:80] for t in texts if _normalized(t) in exact], f"{split}: exact copies of earlier splits"
            assert not [t[:80] for t in texts if len(_normalized(t)) >= 200 and _normalized(t)[:200] in openings]
            # near-copies among documents; a short line ("What is it like to be a human?") is its own words or a copy
            documents = [t for t in texts if len(t.split()) >= 20]
            assert not _near_copies(documents, earlier), f"{split}: near-copies of earlier splits"
        earlier += texts


def test_copies_are_dropped_and_overlapping_held_out_text_is_found():
    story = (
        "The Bank of England has left interest rates on hold at 4.75% for the sixth month in a row. The decision "
        "was widely expected by economists, who said that a slowing housing market and weak high street spending "
        "had eased the pressure on the nine members of the monetary policy committee."
    )
    retitled = "Bank holds rates at 4.75%\n" + story  # the same body under another headline
    follow_up = (
        "Rates may rise next year, analysts warn. Markets expect the Bank to act in the spring. "
        + story.split(". ")[1]
        + ". "
        + " ".join(["Retail figures for December will be published on Thursday by the national statistics office."])
    )
    unrelated = "Chelsea beat Arsenal two nil in a match that left the title race wide open with ten games to play."
    assert drop_duplicates([story, retitled, unrelated]) == [0, 2]
    assert drop_duplicates([story, story.upper(), "  " + story]) == [0]  # case and spacing are no difference
    assert overlapping([follow_up, unrelated], [story]) == [0]  # quotes a third of the story: overlapping
    assert overlapping([unrelated], [story, retitled]) == []


def test_splits_carved_out_of_a_users_data_are_separated_and_described(tmp_path):
    import random

    rng = random.Random(0)
    words = [f"word{i}" for i in range(500)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)]
    lines += [lines[0], lines[1]]  # the user's data repeats itself
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(lines)))
    splits = load_splits(str(data), label_column="label")
    assert set(splits) == {"train", "validation", "test"}
    assert describe_split(splits["test"]) == f"{data}: 20% of the train split, carved out (seed 0)"
    assert describe_split(splits["validation"]) == f"{data}: 20% of the train split, carved out (seed 0)"
    assert describe_split(splits["train"]) == f"{data}, train split less what was carved out of it"
    texts = {split: set(splits[split]["text"]) for split in splits}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    # an embedded corpus with its own validation split keeps it; one without gets one carved out of train
    assert describe_split(load_splits("bbc_news")["validation"]) == "bbc_news, validation split"
    dialog = load_splits("dialog_topics", label_column="label")
    assert len(dialog["validation"]) == 293 and describe_split(dialog["test"]) == "dialog_topics, test split"
    assert describe_split(dialog["train"].map(lambda row: row)) == describe_split(dialog["train"])  # kept by map


def test_local_zero_shot_tasks_keep_no_item_the_training_text_answers(tmp_path):
    news = load_embedded_dataset("bbc_news")
    test_docs = list(news["test"]["text"][:60])
    training = list(news["train"]["text"]) + test_docs[:30]  # as if half the test articles had been trained on
    yamls = write_tasks(tmp_path, test_docs, prefix="news", num_items=100, exclude=training)
    for path in yamls:
        items = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
        assert items
        for item in items:
            passage = item["context"].split()[-12:]  # the last words of the passage, verbatim
            assert not any(" ".join(passage) in " ".join(doc.split()) for doc in test_docs[:30])
    unfiltered = write_tasks(tmp_path / "all", test_docs, prefix="news", num_items=100)
    kept = [len(p.with_suffix(".jsonl").read_text().splitlines()) for p in yamls]
    everything = [len(p.with_suffix(".jsonl").read_text().splitlines()) for p in unfiltered]
    assert all(k < e for k, e in zip(kept, everything))

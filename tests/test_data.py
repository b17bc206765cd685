"""The embedded default datasets: real data shipped by PyPI packages (chatterbot-corpus, scikit-learn)."""

import collections
import re

import pytest
import torch

from hf_collapse.data import (
    EMBEDDED_DATASETS,
    embedded_model_path,
    is_embedded_dataset,
    lm_windows,
    load_bbc_news,
    load_dialog_topics,
    load_digits_images,
    load_embedded_dataset,
    load_newsgroups,
    load_wiki,
    mixed_lm_windows,
    tokenize_text_dataset,
)


@pytest.fixture(scope="module")
def dialog():
    return load_dialog_topics(seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_digits_images(image_size=16, num_channels=3, seed=0)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(embedded_model_path("minilm"))


def _pairs(split):
    return collections.Counter(zip(split["text"], split["label"]))


# ------------------------------------------------------------------------------------------------ dialog topics


def test_dialog_topics_has_several_sorted_topics(dialog):
    assert set(dialog) == {"train", "test"}
    names = dialog["train"].features["label"].names
    assert names == dialog["test"].features["label"].names
    assert len(names) >= 5
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {"ai", "emotion", "trivia"} <= set(names)  # real topics of the English corpus
    assert dialog["train"].features["text"].dtype == "string"


def test_dialog_topics_labels_and_texts_are_valid(dialog):
    names = dialog["train"].features["label"].names
    for split in dialog.values():
        assert set(split.column_names) == {"text", "label"}
        for text, label in zip(split["text"], split["label"]):
            assert isinstance(text, str) and text.strip() == text and text
            assert 0 <= label < len(names)
            assert dialog["train"].features["label"].int2str(label) in names


def test_dialog_topics_split_is_disjoint_stratified_and_deduplicated(dialog):
    train, test = _pairs(dialog["train"]), _pairs(dialog["test"])
    assert max(train.values()) == 1 and max(test.values()) == 1  # (text, topic) pairs are unique
    assert not set(train) & set(test)
    n_topics = len(dialog["train"].features["label"].names)
    train_counts = collections.Counter(dialog["train"]["label"])
    test_counts = collections.Counter(dialog["test"]["label"])
    assert set(train_counts) == set(test_counts) == set(range(n_topics))
    assert min(train_counts[t] + test_counts[t] for t in range(n_topics)) >= 20  # min_examples
    total = len(dialog["train"]) + len(dialog["test"])
    assert len(dialog["test"]) == pytest.approx(0.2 * total, abs=n_topics)
    for topic in range(n_topics):  # stratified: every topic is split 80/20, up to rounding
        assert test_counts[topic] == pytest.approx(0.2 * (train_counts[topic] + test_counts[topic]), abs=1)
    # tech_support repeats 20 distinct lines about a hundred times each: deduplication keeps 20.
    tech = dialog["train"].features["label"].str2int("tech_support")
    assert train_counts[tech] + test_counts[tech] == 20
    # a line under two topics ("Hello") is an example of neither: left out, so no text is in both splits, in any case
    texts = {split: {" ".join(t.lower().split()) for t in dialog[split]["text"]} for split in dialog}
    assert not texts["train"] & texts["test"]
    assert not {t for t, _ in train} & {t for t, _ in test}


def test_dialog_topics_is_deterministic_and_seeded(dialog):
    again = load_dialog_topics(seed=0)
    assert again["train"]["text"] == dialog["train"]["text"]
    assert again["test"]["label"] == dialog["test"]["label"]
    other = load_dialog_topics(seed=1)
    assert set(_pairs(other["test"])) != set(_pairs(dialog["test"]))


def test_dialog_topics_min_examples_drops_small_topics(dialog):
    names = set(dialog["train"].features["label"].names)
    fewer = set(load_dialog_topics(min_examples=100)["train"].features["label"].names)
    assert fewer < names and len(fewer) >= 2
    with pytest.raises(ValueError, match="available"):
        load_dialog_topics(language="klingon")


# ------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_dtypes_and_ranges(digits):
    assert set(digits) == {"train", "test"}
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert digits["train"].features["label"].names == [str(d) for d in range(10)]
    for split in digits.values():
        batch = split[:]
        pixels, labels = batch["pixel_values"], batch["label"]
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.float32
        assert pixels.shape == (len(split), 3, 16, 16)
        assert torch.equal(pixels[:, 0], pixels[:, 2])  # channels are copies
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
        assert pixels.min() < -0.99 and pixels.max() > 0.99  # background and full ink both present
        assert isinstance(labels, torch.Tensor) and set(labels.tolist()) == set(range(10))
    assert len(digits["test"]) == pytest.approx(0.2 * 1797, abs=10)


def test_digits_options_and_trainer_collation():
    small = load_digits_images(image_size=8, num_channels=1, test_size=0.5, seed=3)
    assert small["train"][0]["pixel_values"].shape == (1, 8, 8)
    assert abs(len(small["train"]) - len(small["test"])) <= 1
    transformers = pytest.importorskip("transformers")
    batch = transformers.default_data_collator([small["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["labels"].dtype == torch.int64
    with pytest.raises(ValueError):
        load_digits_images(image_size=0)


# ------------------------------------------------------------------------------------------------ tokenization


def test_tokenize_with_real_minilm_tokenizer(dialog, minilm_tokenizer):
    tokenized = tokenize_text_dataset(dialog, minilm_tokenizer, max_length=12)
    for name, split in tokenized.items():
        assert "text" not in split.column_names
        assert {"input_ids", "attention_mask", "label"} <= set(split.column_names)
        assert split["label"] == dialog[name]["label"]
        lengths = [len(ids) for ids in split["input_ids"]]
        assert max(lengths) == 12  # long lines are truncated, not dropped
        assert min(lengths) < 12  # and nothing is padded
        assert [len(m) for m in split["attention_mask"]] == lengths
    first = tokenized["train"][0]["input_ids"]
    assert first[0] == minilm_tokenizer.cls_token_id and first[-1] == minilm_tokenizer.sep_token_id
    assert minilm_tokenizer.decode(first, skip_special_tokens=True) == (
        minilm_tokenizer.decode(
            minilm_tokenizer(dialog["train"][0]["text"])["input_ids"][:11], skip_special_tokens=True
        )
    )
    with pytest.raises(KeyError, match="sentence"):
        tokenize_text_dataset(dialog, minilm_tokenizer, text_column="sentence")


# ------------------------------------------------------------------------------------------------ registry


def test_embedded_dataset_registry():
    assert set(EMBEDDED_DATASETS) == {"dialog_topics", "digits", "bbc_news", "wiki", "newsgroups"}
    ds = load_embedded_dataset("digits", image_size=8, num_channels=1)
    assert ds["test"][0]["pixel_values"].shape == (1, 8, 8)
    with pytest.raises(KeyError) as raised:
        load_embedded_dataset("imagenet")
    message = str(raised.value)
    assert "imagenet" in message and "dialog_topics" in message and "digits" in message


# ----------------------------------------------------------------------------------------------------- BBC News

BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news(seed=0)


def test_bbc_news_splits_sizes_and_sorted_classes(bbc):
    assert list(bbc) == ["train", "validation", "test"]
    # 2,225 articles, 173 copies of others left out, then 11 held-out articles that overlap an earlier split
    assert {split: len(bbc[split]) for split in bbc} == {"train": 1640, "validation": 203, "test": 198}
    for split in bbc.values():
        assert split.column_names == ["text", "label"]
        assert split.features["label"].names == BBC_CLASSES
        assert split.features["text"].dtype == "string"
    # the distinct articles of each class, each split in the same proportions
    totals = collections.Counter(label for split in bbc.values() for label in split["label"])
    assert [totals[i] for i in range(5)] == [495, 362, 380, 484, 320]
    for name, split in bbc.items():
        counts = collections.Counter(split["label"])
        for label in range(5):
            assert abs(counts[label] / len(split) - totals[label] / totals.total()) < 0.01, (name, label)


def test_bbc_news_splits_are_disjoint_real_articles(bbc):
    seen = {}
    for split in bbc.values():
        for text, label in zip(split["text"], split["label"]):
            assert text and text == text.strip() and "\ufffd" not in text
            assert text not in seen  # each article once: the corpus's copies are left out
            seen[text] = label
    assert len(seen) == 2041
    # a real article, in its class, the title on the first line; the one Windows-1252 file decoded (a pound sign)
    timewarner = [t for t in seen if t.startswith("Ad sales boost Time Warner profit\n")]
    assert len(timewarner) == 1 and BBC_CLASSES[seen[timewarner[0]]] == "business"
    mutu = [t for t in seen if t.startswith("Chelsea sack Mutu\n")]
    assert len(mutu) == 1 and "\u00a315.8m" in mutu[0] and BBC_CLASSES[seen[mutu[0]]] == "sports"


def test_bbc_news_is_deterministic_and_seeded(bbc):
    again = load_embedded_dataset("BBC-News")
    other = load_bbc_news(seed=1)
    for split in bbc:
        assert list(again[split]["text"]) == list(bbc[split]["text"])
        assert list(again[split]["label"]) == list(bbc[split]["label"])
    assert list(other["test"]["text"]) != list(bbc["test"]["text"])
    # the same distinct articles, but for the few held-out ones each split leaves out for overlapping another split
    ours, theirs = ({t for split in d.values() for t in split["text"]} for d in (bbc, other))
    assert len(ours ^ theirs) < 40
    sized = load_bbc_news(validation_size=100, test_size=200)
    assert (len(sized["train"]), len(sized["validation"]), len(sized["test"])) == (1752, 98, 192)
    assert is_embedded_dataset("bbc_news")


# --------------------------------------------------------------------------------------------------- lm_windows


def test_lm_windows_concatenate_texts_with_eos_and_cut_full_windows(minilm_tokenizer):
    tok = minilm_tokenizer
    texts = ["The cat sat on the mat.", "Stocks fell sharply in London today.", "A short one."]
    expected = []
    for text in texts:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]  # no eos: [SEP]
    windows = lm_windows(texts, tok, max_length=5)
    assert len(windows) == len(expected) // 5
    got = [int(i) for row in windows["input_ids"] for i in row]
    assert got == expected[: 5 * len(windows)]  # in order, the tail dropped
    for row in windows:
        assert row["input_ids"].shape == (5,) and row["input_ids"].dtype == torch.int64
        assert torch.equal(row["labels"], row["input_ids"]) and bool(row["attention_mask"].all())
    plain = lm_windows(texts, tok, max_length=5, separator=None)
    assert [int(i) for row in plain["input_ids"] for i in row] == [
        i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]
    ][: 5 * len(plain)]
    assert len(lm_windows(texts, tok, max_length=5, max_windows=2)) == 2


def test_lm_windows_batches_and_refusals(bbc, minilm_tokenizer):
    windows = lm_windows(bbc["test"]["text"], minilm_tokenizer, max_length=64, max_windows=20)
    assert len(windows) == 20
    again = lm_windows(bbc["test"]["text"], minilm_tokenizer, max_length=64, max_windows=20)
    assert torch.equal(windows[:]["input_ids"], again[:]["input_ids"])
    batch = next(iter(torch.utils.data.DataLoader(windows, batch_size=8)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (8, 64)
    with pytest.raises(ValueError, match="max_length"):
        lm_windows(["a b c"], minilm_tokenizer, max_length=1)
    with pytest.raises(ValueError, match="fewer than 64 tokens"):
        lm_windows(["too short"], minilm_tokenizer, max_length=64)
    with pytest.raises(ValueError, match="max_windows"):
        lm_windows(["a b c"], minilm_tokenizer, max_length=2, max_windows=0)
    with pytest.raises(ValueError, match="separator"):
        lm_windows(["a b c"], minilm_tokenizer, max_length=2, separator="bos")


def test_mixed_lm_windows_takes_each_share_and_shuffles(bbc, minilm_tokenizer):
    news = lm_windows(bbc["train"]["text"], minilm_tokenizer, max_length=32, max_windows=6)
    other = lm_windows(bbc["test"]["text"], minilm_tokenizer, max_length=32, max_windows=3)
    mixed = mixed_lm_windows([(bbc["train"]["text"], 6), (bbc["test"]["text"], 3)], minilm_tokenizer, max_length=32)
    rows = sorted(tuple(int(i) for i in r) for r in mixed["input_ids"])
    assert rows == sorted(tuple(int(i) for i in r) for r in [*news["input_ids"], *other["input_ids"]])
    assert [tuple(int(i) for i in r) for r in mixed["input_ids"][:6]] != [
        tuple(int(i) for i in r) for r in news["input_ids"]
    ]  # shuffled, not concatenated
    assert set(mixed[0]) == {"input_ids", "attention_mask", "labels"} and torch.is_tensor(mixed[0]["labels"])
    with pytest.raises(ValueError, match="at least one part"):
        mixed_lm_windows([(bbc["test"]["text"], 0)], minilm_tokenizer)


# ------------------------------------------------------------------------------------------------------- wiki


@pytest.fixture(scope="module")
def wiki():
    return load_wiki()


def test_wiki_is_real_prose_split_by_article(wiki):
    assert list(wiki) == ["train", "validation", "test"]
    assert len(wiki["train"]) > 1000 and len(wiki["test"]) > 50 and wiki["train"].column_names == ["text", "title"]
    titles = {split: set(wiki[split]["title"]) for split in wiki}
    assert not titles["train"] & titles["test"] and not titles["train"] & titles["validation"]  # by article
    assert len(titles["test"]) == round(0.1 * sum(len(t) for t in titles.values()))
    everything = [t for split in wiki.values() for t in split["text"]]
    assert all(len(t) >= 500 and "''" not in t and "==" not in t for t in everything)  # prose, no markup left
    assert sum(len(t) for t in everything) > 2_000_000
    assert not any(t.startswith(("List of", "Wikipedia:")) for split in titles.values() for t in split)
    sections = dict(zip(wiki["train"]["text"], wiki["train"]["title"]))
    sections.update(zip(wiki["test"]["text"], wiki["test"]["title"]))
    sections.update(zip(wiki["validation"]["text"], wiki["validation"]["title"]))
    albedo = [t for t, title in sections.items() if title == "Albedo"]
    assert albedo and "reflect" in albedo[0]  # the article on albedo, about reflected light
    again = load_embedded_dataset("wiki")
    assert list(again["test"]["text"]) == list(wiki["test"]["text"])
    assert set(load_wiki(seed=1)["test"]["title"]) != titles["test"]


# ------------------------------------------------------------------------------------------------- newsgroups


def test_newsgroups_are_the_posters_own_words_in_stratified_splits():
    posts = load_newsgroups()
    assert list(posts) == ["train", "validation", "test"]
    assert posts["train"].features["label"].names == ["alt.atheism", "sci.space"]
    sizes = {split: len(posts[split]) for split in posts}
    assert sizes["train"] > 120 and 15 <= sizes["test"] <= 25 and sum(sizes.values()) <= 200
    share = sum(sum(split["label"]) for split in posts.values()) / sum(sizes.values())
    for split in posts.values():  # both groups in every split, in the same proportion
        assert abs(sum(split["label"]) / len(split) - share) < 0.05
    everything = [t for split in posts.values() for t in split["text"]]
    assert all(len(t) >= 100 for t in everything)
    # headers, quoted replies and attribution lines are gone: what is left is what the poster wrote
    assert not any(re.search(r"^(From|Subject|Path|Message-ID|Newsgroups):", t, re.M) for t in everything)
    assert not any(re.match(r"\s*\w{0,3}>", line) for t in everything for line in t.splitlines())
    assert not any(re.search(r"(writes|wrote):\s*$", t, re.M) for t in everything)
    assert 150_000 < sum(len(t) for t in everything) < 400_000
    assert sum(len(line) > 200 for t in everything for line in t.splitlines()) > 100  # paragraphs, not 70-column lines
    assert any("shuttle" in t.lower() for t in everything) and any("god" in t.lower() for t in everything)
    again = load_embedded_dataset("Newsgroups")
    assert list(again["test"]["text"]) == list(posts["test"]["text"])
    assert set(load_newsgroups(seed=1)["test"]["text"]) != set(posts["test"]["text"])


def test_newsgroups_unpickling_allows_only_the_samples_own_classes():
    import pickle

    from hf_collapse.data.embedded_datasets import _unpickle_bunch

    class Payload:  # anything that is not a Bunch of lists and arrays is refused, never called
        def __reduce__(self):
            return (print, ("should never run",))

    with pytest.raises(pickle.UnpicklingError, match="print is not expected"):
        _unpickle_bunch(pickle.dumps(Payload(), protocol=2))

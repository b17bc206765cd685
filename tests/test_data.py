"""The embedded default datasets: real data shipped by PyPI packages (chatterbot-corpus, scikit-learn)."""

import collections

import pytest
import torch

from hf_collapse.data import (
    EMBEDDED_DATASETS,
    embedded_model_path,
    load_dialog_topics,
    load_digits_images,
    load_embedded_dataset,
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
        minilm_tokenizer.decode(minilm_tokenizer(dialog["train"][0]["text"])["input_ids"][:11], skip_special_tokens=True)
    )
    with pytest.raises(KeyError, match="sentence"):
        tokenize_text_dataset(dialog, minilm_tokenizer, text_column="sentence")


# ------------------------------------------------------------------------------------------------ registry


def test_embedded_dataset_registry():
    assert set(EMBEDDED_DATASETS) == {"dialog_topics", "digits"}
    ds = load_embedded_dataset("digits", image_size=8, num_channels=1)
    assert ds["test"][0]["pixel_values"].shape == (1, 8, 8)
    with pytest.raises(KeyError) as raised:
        load_embedded_dataset("imagenet")
    message = str(raised.value)
    assert "imagenet" in message and "dialog_topics" in message and "digits" in message

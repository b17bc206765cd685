"""Evaluation the field's way: local zero-shot tasks built from held-out text, run by lm-eval-harness on the
in-memory model (its results checked against log-likelihoods computed here from the model's own logits), and
perplexity on several corpora, recorded at each stage into the report, its markdown and the model card."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import save_tiny_llm_with_smollm2_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_collapse
from hf_collapse.data import lm_windows, load_bbc_news
from hf_collapse.data.zero_shot_tasks import continuation_items, last_word_items, sentences, write_tasks
from hf_collapse.report import CollapseReport

lm_eval = pytest.importorskip("lm_eval")

from hf_collapse.lm_evaluation import (  # noqa: E402
    LMEvaluation,
    local_task_corpus,
    primary_metric,
    task_name,
    zero_shot,
)


@pytest.fixture(scope="module")
def news_test():
    return list(load_bbc_news()["test"]["text"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_llm_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llm"), num_hidden_layers=3)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_continuation_items_hold_the_true_next_sentence_among_others(news_test):
    items = continuation_items(news_test, 60)
    assert len(items) == 60
    by_document = [sentences(d) for d in news_test]
    for item in items:
        choices, gold = item["choices"], item["choices"][item["label"]]
        assert len(set(choices)) == 4
        # the gold sentence follows the context in one document; the others come from other documents
        source = [d for d in by_document if gold in d and item["context"].split()[-1] in d[d.index(gold) - 1]]
        assert source, item
        assert all(c not in source[0] for c in choices if c != gold)
        assert all(0.5 <= len(c) / len(gold) <= 2.0 for c in choices)
    assert len({i["label"] for i in items}) == 4  # the answer is not always in the same place
    assert continuation_items(news_test, 60) == items  # seeded
    short = continuation_items(news_test[:8], 100)  # a short corpus: several items per document, none twice
    assert len(short) > 8 and len({(i["context"], i["choices"][i["label"]]) for i in short}) == len(short)


def test_last_word_items_ask_for_a_word_the_passage_already_holds(news_test):
    items = last_word_items(news_test, 60)
    assert len(items) == 60
    for item in items:
        word = item["target"].strip()
        assert item["target"].startswith(" ") and re.fullmatch(r"[A-Za-z]{4,}", word)
        assert re.search(rf"\b{word}\b", " ".join(item["context"].split()[:-1]))
        assert any(item["context"].split()[-1] + item["target"] in " ".join(d.split()) for d in news_test)


def test_write_tasks_writes_yaml_that_lm_eval_loads_from_any_directory(news_test, tmp_path, monkeypatch):
    yamls = write_tasks(tmp_path / "tasks", news_test, prefix="news", num_items=10)
    assert [p.name for p in yamls] == ["news_continuation.yaml", "news_last_word.yaml"]
    assert [task_name(p) for p in yamls] == ["news_continuation", "news_last_word"]
    assert len((tmp_path / "tasks" / "news_continuation.jsonl").read_text().splitlines()) == 10
    monkeypatch.chdir(tmp_path)  # the data path in the YAML is absolute
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    loaded = manager.load(["news_continuation"])["tasks"]
    assert len(list(next(iter(loaded.values())).test_docs())) == 10
    with pytest.raises(ValueError, match="prefix"):
        write_tasks(tmp_path, news_test, prefix="bad name")
    with pytest.raises(ValueError, match="unknown task kind"):
        write_tasks(tmp_path, news_test, prefix="x", kinds=["topic"])


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the way lm-eval-harness defines it: the continuation's tokens are those of
    context + continuation after the context's own tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(start, len(whole))))


def test_zero_shot_is_lm_eval_on_the_in_memory_model(tiny, news_test, tmp_path):
    model, tokenizer = tiny
    yamls = write_tasks(tmp_path, news_test, prefix="news", num_items=12)
    model.train()
    results = zero_shot(model, tokenizer, yamls, batch_size=4)
    assert model.training  # mode restored
    assert set(results) == {"news_continuation", "news_last_word"}
    items = [json.loads(line) for line in (tmp_path / "news_continuation.jsonl").read_text().splitlines()]
    model.eval()
    right = right_norm = 0
    for item in items:
        scores = [_loglikelihood(model, tokenizer, item["context"], " " + c) for c in item["choices"]]
        normed = [s / len(" " + c) for s, c in zip(scores, item["choices"])]
        right += max(range(4), key=scores.__getitem__) == item["label"]
        right_norm += max(range(4), key=normed.__getitem__) == item["label"]
    assert results["news_continuation"]["acc"] == pytest.approx(right / len(items))
    assert results["news_continuation"]["acc_norm"] == pytest.approx(right_norm / len(items))
    assert primary_metric(results["news_continuation"]) == ("acc_norm", results["news_continuation"]["acc_norm"])
    assert 0 <= results["news_last_word"]["acc"] <= 1 and results["news_last_word"]["perplexity"] > 1
    # a collapsed model is evaluated as it is (in memory, not reloaded from a name)
    smaller = hf_collapse.remove_blocks(model, ["model.layers.1"])
    assert zero_shot(smaller, tokenizer, yamls[1:], batch_size=4) != {"news_last_word": results["news_last_word"]}


def test_zero_shot_refusals(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="at least one task"):
        zero_shot(model, tokenizer, [])
    with pytest.raises(ValueError, match=r"does not know the task\(s\) \['no_such_task_anywhere'\]"):
        zero_shot(model, tokenizer, ["no_such_task_anywhere"])
    with pytest.raises(FileNotFoundError, match="no task file"):
        zero_shot(model, tokenizer, [tmp_path / "missing.yaml"])


def test_lm_evaluation_records_every_stage_into_the_report_and_the_card(tiny, news_test, tmp_path):
    model, tokenizer = tiny
    news = torch.utils.data.DataLoader(lm_windows(news_test, tokenizer, max_length=32, max_windows=4), batch_size=4)
    other_text = list(load_bbc_news()["validation"]["text"])
    other = torch.utils.data.DataLoader(lm_windows(other_text, tokenizer, max_length=32, max_windows=4), batch_size=4)
    yamls = write_tasks(tmp_path / "tasks", news_test, prefix="news", kinds=["continuation"], num_items=8)
    evaluation = LMEvaluation(
        {"news": news, "other": other},
        healing_corpora=["news"],
        tokenizer=tokenizer,
        tasks=yamls,
        batch_size=4,
        described={"news": "news, test split", "other": "other, validation split"},
    )
    smaller, report = hf_collapse.collapse(model, {"model.layers.1": 0.0}, num_units=1, latency_repeats=0)
    first = evaluation.measure(model, "original", report)
    evaluation.measure(smaller, "after removal", report)
    assert first["perplexity on news"] == pytest.approx(hf_collapse.metrics.perplexity(model, news))
    names = [e.name for e in report.evaluations]
    assert names == ["perplexity on news", "perplexity on other", "news_continuation"]
    entry = report.evaluations[1]
    assert not entry.seen_in_healing and report.evaluations[0].seen_in_healing
    assert entry.relative("after removal") == pytest.approx(entry.values["after removal"] / entry.values["original"])
    assert report.evaluations[2].metric == "acc_norm" and report.evaluations[2].seen_in_healing
    markdown = report.to_markdown()
    assert "## Results at each stage" in markdown and "| perplexity on other | other, validation split |" in markdown
    report.save(tmp_path / "report")
    again = CollapseReport.load(tmp_path / "report")
    assert again.evaluations == report.evaluations
    card = hf_collapse.hub.model_card(smaller, report).content
    assert "## Results" in card
    assert "The training part of news calibrated the model; other is text of a kind it never saw." in card
    with pytest.raises(ValueError, match="unknown stage"):
        report.record("x", "after lunch", 1.0, metric="acc", higher_is_better=True)


def test_a_local_task_belongs_to_the_corpus_of_its_whole_name():
    """``wiki_2024_continuation`` is a task of a corpus named ``wiki_2024``, never of ``wiki`` by a shared prefix (it
    would be marked as text that healed the model)."""
    corpora = ["wiki", "bbc_news"]
    assert local_task_corpus("wiki_continuation", corpora) == "wiki"
    assert local_task_corpus("bbc_news_last_word", corpora) == "bbc_news"
    assert local_task_corpus("wiki_2024_continuation", corpora) is None
    assert local_task_corpus("wiki_2024_continuation", [*corpora, "wiki_2024"]) == "wiki_2024"
    assert local_task_corpus("hellaswag", corpora) is None

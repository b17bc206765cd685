"""``hf-collapse prune`` (and ``hf-collapse lacoot`` on a causal LM) end to end on a tiny random-init Llama that
carries SmolLM2's real tokenizer, on the embedded BBC News text: scoring, removal under a budget, healing,
perplexity, tokens/s, the saved model and its card."""

import json

import pytest
from tiny_models import save_tiny_llm_with_smollm2_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_collapse
from hf_collapse.commands import main
from hf_collapse.commands.prune import PruneJobArguments


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return save_tiny_llm_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llm"), num_hidden_layers=5)


FAST = [
    "--max_length",
    "32",
    "--calibration_windows",
    "8",
    "--heal_windows",
    "16",
    "--eval_windows",
    "8",
    "--batch_size",
    "4",
    "--generate_tokens",
    "4",
    "--latency_repeats",
    "1",
    "--disable_tqdm",
    "true",
]


@pytest.mark.slow
def test_prune_removes_heals_measures_and_saves(tiny_llm, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llm),
            "--num_units",
            "2",
            "--method",
            "loss",
            "--heal",
            "linear",
            "--heal_mix",
            "none",  # the user's domain only, an explicit choice
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "removed 2 blocks: perplexity" in out and "perplexity after healing (linear)" in out and "tokens/s" in out
    assert "saved model (after healing) on test data: perplexity on bbc_news" in out
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert len(report.removed) == 2 and report.metric_name == "perplexity" and not report.higher_is_better
    extra = report.extra
    budget = report.budget_evaluation()  # the budget's metric on the validation text, at every stage
    assert budget.role == "validation" and budget.values["original"] == report.before.metric
    assert budget.values["after removal"] == report.after.metric and budget.values["after healing"] > 1
    assert extra["tokens_per_s_after"] > 0 and extra["heal"] == "linear"
    assert extra["heal_windows"] == 16 and "heal_mix" not in extra
    assert "healing: linear" in out and "mixed in" not in out  # --heal_mix none: nothing mixed in
    saved = tmp_path / "collapsed"
    assert {"README.md", "tradeoff.png", "config.json", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(saved)  # plain reload: 3 layers, the healed weights
    assert reloaded.config.num_hidden_layers == 3
    assert json.loads((saved / "config.json").read_text())["hf_collapse"]["plain_reload_exact"]


@pytest.mark.slow
def test_prune_under_a_perplexity_budget_with_sublayers(tiny_llm, tmp_path, capsys):
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llm),
            "--granularity",
            "attention",
            "--max_metric_ratio",
            "1.5",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.budget["max_metric_ratio"] == 1.5
    assert all(s.metric <= 1.5 * report.before.metric for s in report.kept_steps)
    assert all(".self_attn" in r["name"] for r in report.removed)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    assert hf_collapse.collapse_record(reloaded) is not None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sleb", "blockpruner", "blockpruner --per_flop --flops_fraction 0.9", "span"])
def test_prune_with_each_search(method, tiny_llm, tmp_path, capsys):
    method, *flags = method.split()
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llm),
            "--method",
            method,
            *flags,
            "--num_units",
            "2",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.method == f"prune ({method})" and report.extra["search_cost"]["forward_passes"] > 0
    if flags:  # per FLOP: each step says the loss it reached; the search stops at 2 units or at 90% of the FLOPs
        assert report.budget == {"num_units": 2, "flops_fraction": 0.9}
        assert report.after.removed == 2 or report.after.flops <= 0.9 * report.before.flops
        assert all("calibration_loss" in s.details for s in report.steps[1:])
    else:
        assert report.after.removed == 2
    if method == "span":  # two consecutive blocks, in one step
        (step,) = report.steps[1:]
        first, second = (int(name.rsplit(".", 1)[1]) for name in step.unit.split(", "))
        assert second == first + 1
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    assert len(hf_collapse.collapse_record(reloaded)["edits"]) == (1 if method == "span" else report.after.removed)


@pytest.mark.slow
def test_prune_measures_other_text_and_zero_shot_tasks_at_every_stage(tiny_llm, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    code = main(
        [
            "prune",
            "--model",
            str(tiny_llm),
            "--num_units",
            "2",
            "--method",
            "loss",
            "--heal",
            "linear",  # general text (wiki) mixed into healing by default
            "--eval_tasks",
            "local",
            "--eval_limit",
            "6",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    names = [e.name for e in report.evaluations]
    assert names == [
        "perplexity (the budget's)",
        "perplexity on bbc_news",
        "perplexity on wiki",
        "perplexity on newsgroups",
        "bbc_news_continuation",
        "bbc_news_last_word",
        "wiki_continuation",
        "wiki_last_word",
        "newsgroups_continuation",
        "newsgroups_last_word",
    ]
    for entry in report.evaluations[1:]:
        assert list(entry.values) == ["original", "after removal", "after healing"]
        # wiki is mixed in by default: the training text of news and wiki healed the model, newsgroups' never did
        assert entry.seen_in_healing == ("newsgroups" not in entry.name) and entry.role == "test"
    news = report.evaluations[1]  # the first test row: the budget's (validation) row comes first
    assert news.name == "perplexity on bbc_news" and news.role == "test" and news.data == "bbc_news, test split"
    assert news.values["original"] != pytest.approx(report.before.metric)  # test text, not the budget's
    assert report.extra["heal_mix"] == ["wiki"] and report.extra["heal_windows"] == 16
    assert "healing: linear with wiki mixed in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "zero_shot_tasks").iterdir()) == sorted(
        f"{c}_{k}.{x}"
        for c in ("bbc_news", "wiki", "newsgroups")
        for k in ("continuation", "last_word")
        for x in ("jsonl", "yaml")
    )
    card = (tmp_path / "collapsed" / "README.md").read_text()
    assert "## Results" in card and "| wiki_continuation (acc_norm) | lm-eval task on wiki, test split" in card
    assert "The training part of bbc_news, wiki healed the model (linear); newsgroups is text of a kind it" in card
    assert "## Results at each stage" in (tmp_path / "report" / "report.md").read_text()


def test_healing_mixes_general_text_by_default_and_the_domain_alone_is_a_choice():
    def job(**flags):
        return PruneJobArguments(num_units=1, **flags)

    assert job(heal="lora").healing_mix() == ["wiki"]  # news (the default --dataset) healed with Wikipedia mixed in
    assert job(heal="distill", dataset="wiki").healing_mix() == ["bbc_news"]
    assert job(heal="lora", heal_mix=["none"]).healing_mix() == []  # the user's domain only
    assert job(heal="lora", heal_mix=["bbc_news", "wiki"]).healing_mix() == ["wiki"]  # --dataset is not mixed in
    assert job().healing_mix() == [] and job(heal_mix=["none"]).healing_mix() == []  # no healing, nothing mixed
    # measured by default: the general corpus and newsgroups, text of a kind the default healing never sees
    assert job(heal="lora").measured_corpora() == ["bbc_news", "wiki", "newsgroups"]
    assert job(dataset="wiki").measured_corpora() == ["wiki", "bbc_news", "newsgroups"]
    assert job(dataset="newsgroups", heal="lora").measured_corpora() == ["newsgroups", "wiki"]
    assert job(eval_datasets=["none"]).measured_corpora() == ["bbc_news"]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--num_units", "0"], "--num_units must be an integer >= 1, got 0"),
        (
            ["--max_metric_ratio", "0.5"],
            "max_metric_ratio must be >= 1 (the metric may get this many times worse), got",
        ),
        ([], "no budget: pass --num_units, --flops_fraction, --max_metric_delta, --max_metric_ratio"),
        (["--flops_fraction", "1.5"], "--flops_fraction must be between 0 and 1 (the share of the original's FLOPs"),
        (["--num_units", "1", "--heal", "magic"], "--heal 'magic': expected one of distill, lora, linear"),
        (["--num_units", "1", "--method", "magic"], "--method 'magic': expected one of"),
        (
            ["--num_units", "1", "--method", "sleb", "--granularity", "mlp"],
            "--method sleb: method 'sleb' chooses its own units",
        ),
        (["--max_metric_ratio", "2", "--method", "span"], "method 'span' removes num_units consecutive blocks"),
        (["--num_units", "1", "--method", "sleb", "--per_flop"], "per_flop is an option of method 'blockpruner', not"),
        (["--num_units", "1", "--heal_mix", "wiki"], "--heal_mix mixes text into healing: give --heal too"),
        (["--num_units", "1", "--eval_datasets", "./nowhere.txt"], "--eval_datasets: dataset './nowhere.txt'"),
        (["--num_units", "1", "--eval_tasks", "nowhere.yaml"], "--eval_tasks 'nowhere.yaml': no such task file"),
        (["--num_units", "1", "--heal", "lora", "--heal_mix_ratio", "1"], "--heal_mix_ratio must be between 0"),
        # a healing that cannot heal the removal is refused before the search, not after it
        (["--num_units", "1", "--method", "blockpruner", "--heal", "linear"], "--heal linear: healing 'linear' ("),
        (["--num_units", "1", "--granularity", "attention", "--heal", "linear"], "heal it with distill or lora"),
    ],
)
def test_prune_refuses_bad_arguments_before_any_work(argv, expected, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prune", *argv]) == 2
    assert expected in capsys.readouterr().err


# ------------------------------------------------------------------------------- hf-collapse lacoot on a causal LM


@pytest.mark.slow
def test_lacoot_command_on_a_causal_lm_trains_on_text_windows_and_collapses_under_a_perplexity_budget(
    tiny_llm, tmp_path, capsys
):
    code = main(
        [
            "lacoot",
            "--model",
            str(tiny_llm),
            "--dataset",
            "bbc_news",
            "--max_length",
            "32",
            "--eval_windows",
            "8",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--per_device_eval_batch_size",
            "4",
            "--eval_strategy",
            "no",
            "--num_units",
            "2",
            "--max_metric_ratio",
            "100",
            "--latency_repeats",
            "1",
            "--output_dir",
            str(tmp_path),
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "LaCoOT on" in out and "perplexity" in out
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.metric_name == "perplexity" and not report.higher_is_better
    assert report.budget["max_metric_ratio"] == 100 and len(report.removed) == 2
    assert report.extra["msw_weight"] == 1e-4 and report.extra["test_examples"] == 8  # the causal-LM default λ
    assert report.extra["validation_examples"] == 8
    collapsed = AutoModelForCausalLM.from_pretrained(tmp_path / "collapsed")  # plain reload
    assert collapsed.config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(tmp_path / "collapsed").eos_token_id is not None


def test_causal_lm_task_is_recognised_from_the_config_and_budgets_follow_the_task(tiny_llm):
    from hf_collapse.commands.lacoot import LaCoOTJobArguments
    from hf_collapse.commands.tlc import TLCJobArguments, run_tlc_job
    from hf_collapse.data.tasks import resolve_task

    job = LaCoOTJobArguments(model=str(tiny_llm))
    assert resolve_task(job.model, job.task) == "causal_lm" and resolve_task("minilm") == "classification"
    assert job.metric_budget("causal_lm") == {"max_metric_ratio": 1.25}
    assert LaCoOTJobArguments(max_metric_delta=2.0).metric_budget("causal_lm") == {
        "max_metric_delta": 2.0,
        "max_metric_ratio": None,
    }
    assert job.metric_budget("classification") == {"max_metric_delta": 0.05}
    # One budget vocabulary: a ratio bounds accuracy too (at least the trained model's accuracy / 1.5).
    assert LaCoOTJobArguments(max_metric_ratio=1.5).metric_budget("classification") == {
        "max_metric_delta": None,
        "max_metric_ratio": 1.5,
    }
    with pytest.raises(ValueError, match="--task 'lm': expected one of auto, classification, causal_lm"):
        LaCoOTJobArguments(task="lm")
    with pytest.raises(ValueError, match="hf-collapse tlc runs classification tasks"):
        TLCJobArguments(task="causal_lm")
    with pytest.raises(ValueError, match="is a causal LM: hf-collapse tlc runs classification tasks"):
        run_tlc_job(TLCJobArguments(model=str(tiny_llm)), None)


def test_prune_training_defaults_follow_the_healing_method():
    from hf_collapse.commands.prune import DEFAULT_PRUNE_TRAINING, prune_training_defaults

    assert prune_training_defaults("lora")["learning_rate"] == 5e-4
    assert prune_training_defaults("distill") == prune_training_defaults(None) == DEFAULT_PRUNE_TRAINING
    assert DEFAULT_PRUNE_TRAINING["learning_rate"] == 5e-5

"""Numbers a user can stake a decision on: the card's headline is the saved model's result on test text, measured again
here in a fresh process; the budget decides on validation text; a failure after the search keeps the pruned model and
resumes without searching again; a budget that cannot be met is refused or said; the report records what was done."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from test_prune_command import FAST
from tiny_models import save_tiny_llm_with_smollm2_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_collapse
from hf_collapse.commands import main
from hf_collapse.commands.prune import PruneJobArguments, _healing_windows
from hf_collapse.data import lm_windows, load_splits


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return save_tiny_llm_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llm"), num_hidden_layers=5)


def _perplexity_by_hand(model, tokenizer, split: str) -> float:
    """exp of the mean next-token loss over the job's windows of a bbc_news split (32 tokens, 8 windows): every window
    is full, so the mean of the windows' losses is the mean over tokens."""
    windows = lm_windows(load_splits("bbc_news")[split]["text"], tokenizer, max_length=32, max_windows=8)
    with torch.no_grad():
        losses = [float(model.eval()(**{k: v[None] for k, v in row.items()}).loss) for row in windows]
    return float(torch.tensor(losses).mean().exp())


@pytest.fixture(scope="module")
def healed_run(tiny_llm, tmp_path_factory):
    """``hf-collapse prune --heal lora`` with Usenet posts mixed in: more healing windows asked of them than exist."""
    output = tmp_path_factory.mktemp("healed")
    argv = ["prune", "--model", str(tiny_llm), "--method", "loss", "--num_units", "2", "--heal", "lora"]
    argv += ["--heal_mix", "newsgroups", "--eval_datasets", "none", "--output_dir", str(output), *FAST]
    argv += ["--heal_windows", "4000", "--max_steps", "2"]  # overrides FAST's --heal_windows: the last one wins
    assert main(argv) == 0
    return output


@pytest.mark.slow
def test_the_cards_headline_is_the_saved_models_test_perplexity_measured_in_a_fresh_process(healed_run):
    script = textwrap.dedent(
        """
        import json, sys
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM, AutoTokenizer
        sys.path.insert(0, sys.argv[2])
        from test_honest_numbers import _perplexity_by_hand
        folder = sys.argv[1]
        card = ModelCard.load(folder + "/README.md")
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        results = [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results]
        print(json.dumps({"measured": _perplexity_by_hand(model, tokenizer, "test"), "results": results}))
        """
    )
    tests = str(__import__("pathlib").Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", script, str(healed_run / "collapsed"), tests],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    (result,) = seen["results"]  # one result per dataset and metric: no second, stale entry for the same text
    assert result[:3] == ["bbc_news", "test", "perplexity"]
    assert result[3] == pytest.approx(seen["measured"], rel=1e-4)  # the healed, saved model's, not the pruned one's
    report = hf_collapse.CollapseReport.load(healed_run / "report")
    tested = report.headline()
    assert tested.role == "test" and tested.values["after healing"] == pytest.approx(seen["measured"], rel=1e-4)
    assert tested.values["after removal"] != pytest.approx(tested.values["after healing"])
    card = (healed_run / "collapsed" / "README.md").read_text()
    assert "Result of this model (after healing): **perplexity " in card and "bbc_news, test split" in card


@pytest.mark.slow
def test_the_budget_decides_on_validation_text_and_the_report_names_every_role(healed_run, tiny_llm):
    report = hf_collapse.CollapseReport.load(healed_run / "report")
    original = AutoModelForCausalLM.from_pretrained(tiny_llm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    assert report.before.metric == pytest.approx(_perplexity_by_hand(original, tokenizer, "validation"), rel=1e-4)
    tested = _perplexity_by_hand(original, tokenizer, "test")
    assert report.headline().values["original"] == pytest.approx(tested, rel=1e-4)
    roles = report.data_roles
    assert roles["calibration"] == "bbc_news, train split (its first 8 windows of 32 tokens)"
    assert roles["validation"] == "bbc_news, validation split (its first 8 windows of 32 tokens)"
    assert roles["test"] == "bbc_news, test split (its first 8 windows of 32 tokens)"
    assert roles["healing"].startswith("the train splits (2000 windows of bbc_news, ")
    card = (healed_run / "collapsed" / "README.md").read_text()
    for role in ("calibration", "validation", "test", "healing"):
        assert f"- **{role}** (" in card and roles[role] in card


@pytest.mark.slow
def test_the_report_records_the_mix_that_was_reached_not_the_one_asked(healed_run):
    report = hf_collapse.CollapseReport.load(healed_run / "report")
    windows = report.extra["heal_windows"]
    reached = report.extra["heal_mix_ratio"]
    assert report.extra["heal_mix_ratio_requested"] == 0.5 and reached < 0.5  # the Usenet posts ran out
    news = int(report.data_roles["healing"].split("(")[1].split(" windows")[0])
    assert reached == pytest.approx(1 - news / windows, abs=1e-4)


def test_the_healing_windows_say_how_many_each_corpus_gave(tiny_llm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    job = PruneJobArguments(model=str(tiny_llm), num_units=1, heal="lora", heal_mix=["newsgroups"])
    job.max_length, job.heal_windows = 32, 40
    windows, shares = _healing_windows(
        job, type("Args", (), {"seed": 0})(), tokenizer, load_splits("bbc_news")["train"]["text"]
    )
    assert shares == [20, 20] and len(windows) == 40


@pytest.mark.slow
def test_a_failure_after_the_search_keeps_the_pruned_model_and_resume_heals_without_searching(
    tiny_llm, tmp_path, capsys, monkeypatch
):
    import hf_collapse.pipeline
    import hf_collapse.scoring

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    argv = ["prune", "--model", str(tiny_llm), "--method", "loss", "--num_units", "2", "--eval_datasets", "none"]
    argv += ["--output_dir", str(tmp_path), *FAST, "--max_steps", "2"]
    monkeypatch.setattr(hf_collapse.pipeline, "heal", out_of_memory)  # the pipeline's healing step
    assert main([*argv, "--heal", "distill"]) == 2
    err = capsys.readouterr().err
    assert "CUDA out of memory (simulated)" in err
    assert f"Continue without searching again: --resume_from {tmp_path / 'prune_progress'}" in err
    # what the search found is saved with an honest card (the pruned model, before healing), and reloads plainly
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "collapsed")
    assert pruned.config.num_hidden_layers == 3
    assert "Result of this model (after removal)" in (tmp_path / "collapsed" / "README.md").read_text()
    searched = hf_collapse.CollapseReport.load(tmp_path / "report")
    monkeypatch.undo()

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran again")

    monkeypatch.setattr(hf_collapse.scoring, "score_blocks", no_search)  # prune() imports it when it runs
    resumed = [*argv, "--heal", "lora", "--resume_from", str(tmp_path / "prune_progress")]
    assert main(resumed) == 0, capsys.readouterr().err
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.removed == searched.removed and report.extra["heal"] == "lora"
    assert list(report.headline().values) == ["original", "after removal", "after healing"]
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "collapsed")  # the healed model replaced the pruned one
    pruned_weights = pruned.state_dict()
    assert any(not torch.equal(tensor, pruned_weights[name]) for name, tensor in healed.state_dict().items())


def _tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


def _batches():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), generator=generator)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


@pytest.mark.parametrize(
    "method,num_units,most",
    [("sleb", 10, 3), ("block_influence", 10, 3), ("loss", 4, 3), ("blockpruner", 10, 7)],
)
def test_every_method_refuses_more_units_than_it_can_remove(method, num_units, most):
    """One answer to one request: a 4-layer model keeps one block, so 3 blocks (7 sub-layers) at most."""
    with pytest.raises(ValueError, match=f"can remove at most {most} of this model's"):
        hf_collapse.prune(_tiny_llama(), _batches(), method=method, num_units=num_units, latency_repeats=0)


def test_a_flops_budget_out_of_reach_is_refused_up_front_or_reported_as_not_met(caplog, tmp_path):
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"flops_fraction = 0.05, but removing every block this search may remove"):
        hf_collapse.prune(model, _batches(), method="block_influence", flops_fraction=0.05, latency_repeats=0)
    with caplog.at_level(logging.WARNING, logger="hf_collapse.engine.search"):
        smaller, report = hf_collapse.prune(model, _batches(), method="sleb", flops_fraction=0.05, latency_repeats=0)
    assert report.after.removed == 3 and report.after.flops > 0.05 * report.before.flops
    assert report.stopped_by == "exhausted" and report.budget_met is False
    assert "the budget was not met" in caplog.text
    assert "**the budget was not met**" in hf_collapse.hub.model_card(smaller, report).content
    reached, met = hf_collapse.prune(model, _batches(), method="sleb", num_units=2, latency_repeats=0)
    assert met.stopped_by == "num_units" and met.budget_met is True
    again = hf_collapse.CollapseReport.from_dict(json.loads(report.to_json()))
    assert again.budget_met is False and again.stopped_by == "exhausted"

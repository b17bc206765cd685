"""``hf-collapse trady`` end to end on a tiny random-init Llama that carries SmolLM2's real tokenizer, on the embedded
BBC News text: calibration, training, the peak-step memory report (TraDy against full fine-tuning), the adapter
(reloaded with PeftModel.from_pretrained) and the merged model (reloaded with plain from_pretrained)."""

import json

import pytest
import torch
from peft import PeftModel
from tiny_models import save_tiny_llm_with_smollm2_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_collapse.trady  # noqa: F401 - registers TRADY with peft, for PeftModel.from_pretrained
from hf_collapse.commands import main


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return save_tiny_llm_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llm"), num_hidden_layers=3)


# 8 windows at batch 4: 2 steps per epoch, so 4 steps re-sample once (merged channels go into the adapter)
FAST = [
    "--max_length",
    "32",
    "--train_windows",
    "8",
    "--eval_windows",
    "4",
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--calibration_batches",
    "2",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "1",
    "--learning_rate",
    "0.01",
]


def test_trady_command_trains_measures_and_saves_a_reloadable_adapter_and_merged_model(tiny_llm, tmp_path, capsys):
    code = main(
        [
            "trady",
            "--model",
            str(tiny_llm),
            "--budget_ratio",
            "0.1",
            "--selection",
            "rgn_weighted",  # a selection that re-draws at the epoch boundary (checked below)
            "--merge",
            "true",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "TraDy on" in out and "| peak of a training step |" in out and "test perplexity:" in out
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert report["task"] == "causal_lm" and report["train_steps"] == 4 and report["train_examples"] == 8
    assert report["metric_before"] > 1 and report["metric_after"] > 1
    assert report["budget"] == "0.1 of the cost of every channel" and report["selected_layers"]
    trady, full = report["step_memory"]["trady"], report["step_memory"]["full"]
    assert trady["method"] == "trady" and full["method"] == "full"
    assert trady["peak_bytes"] < full["peak_bytes"] and report["peak_ratio_to_full"] < 1
    assert trady["optimizer_state_bytes"] < 0.2 * full["optimizer_state_bytes"]
    for step in (trady, full):
        assert step["peak_bytes"] >= step["parameter_bytes"] + step["optimizer_state_bytes"]
    assert 0 < report["budget_summary"]["used_bytes"] <= report["budget_summary"]["budget_bytes"]
    markdown = (tmp_path / "memory_report.md").read_text()
    assert "## Peak memory of one training step" in markdown and "| trady | full |" in markdown
    # the adapter folder a user uploads has its card: the data's roles and the test metric, before and after
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "- **test** (only reported: no decision was made on it): bbc_news, test split" in card
    assert f"Test perplexity: {report['metric_before']:.4f} before, {report['metric_after']:.4f} after" in card

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("trady_merged_index" in key for key in saved)  # the epoch boundary re-sampled and merged
    adapter = AutoModelForCausalLM.from_pretrained(tiny_llm)
    adapter = PeftModel.from_pretrained(adapter, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # plain transformers
    assert type(merged).__name__ == "LlamaForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    inputs = AutoTokenizer.from_pretrained(tmp_path / "merged")(
        ["The markets rose sharply on Monday."], return_tensors="pt"
    )
    with torch.no_grad():
        expected = merged(**inputs).logits
        torch.testing.assert_close(adapter(**inputs).logits, expected, rtol=0, atol=1e-5)
        assert not torch.allclose(original(**inputs).logits, expected, atol=1e-4)  # training did change it


def test_trady_command_takes_a_budget_in_bytes_without_the_full_comparison(tiny_llm, tmp_path):
    code = main(
        [
            "trady",
            "--model",
            str(tiny_llm),
            "--budget_bytes",
            "400000",
            "--compare_full",
            "false",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert report["budget"] == "400000 bytes" and report["budget_summary"]["budget_bytes"] == 400000
    assert set(report["step_memory"]) == {"trady"} and "peak_ratio_to_full" not in report
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and not (tmp_path / "merged").exists()


def test_trady_command_keeps_the_whole_step_under_a_peak_budget_and_says_what_it_bought(tiny_llm, tmp_path):
    """``--peak_bytes`` bounds the measured peak of the training step on the job's own batch shape (4 x 32 here):
    measured against full fine-tuning's peak on that shape, measured here with the same function."""
    from hf_collapse.profiling import step_memory

    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    ids = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    full = step_memory(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).peak_bytes
    limit = int(0.93 * full)  # this Llama is tiny but its 49k-word logits are not: every plan holds them
    argv = ["trady", "--model", str(tiny_llm), "--peak_bytes", str(limit), "--output_dir", str(tmp_path), *FAST]
    assert main(argv) == 0
    report = json.loads((tmp_path / "memory_report.json").read_text())
    plan = report["peak_plan"]
    assert plan["peak_bytes"] == limit and report["peak_met"] is True
    assert report["step_memory"]["trady"]["peak_bytes"] <= limit < report["step_memory"]["full"]["peak_bytes"]
    assert report["budget"].startswith(f"a peak of {limit} bytes per training step")
    markdown = (tmp_path / "memory_report.md").read_text()
    assert "## Peak budget" in markdown and f"| {limit / 2**20:,.1f} MiB |" in markdown
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peak_bytes"] == limit and saved["peak_plan"]["budget_elements"] == plan["budget_elements"]


def test_trady_command_refuses_a_peak_budget_below_the_smallest_step(tiny_llm, tmp_path, capsys):
    argv = ["trady", "--model", str(tiny_llm), "--peak_bytes", "1000", "--output_dir", str(tmp_path), *FAST]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "peak_bytes=1,000" in err and "cannot be met" in err and "Raise peak_bytes to at least" in err
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "argv,expected",
    [
        ([], "no budget: pass --budget_ratio (a fraction of every channel's cost, e.g. 0.05), --budget_bytes, or"),
        (["--peak_bytes", "0"], "--peak_bytes must be >= 1, got 0"),
        (["--budget_ratio", "0.1", "--budget_bytes", "1000"], "two budgets: pass --budget_ratio or --budget_bytes"),
        (["--budget_ratio", "1.5"], "--budget_ratio must be in (0, 1], got 1.5"),
        (["--budget_bytes", "0"], "--budget_bytes must be >= 1, got 0"),
        (
            ["--budget_ratio", "0.1", "--selection", "best"],
            "--selection 'best': expected one of trady, static_topk_random",
        ),
        (["--budget_ratio", "0.1", "--task", "seq2seq"], "--task 'seq2seq': expected one of auto, classification"),
        (["--budget_ratio", "0.1", "--max_depth", "0"], "--max_depth must be >= 1, got 0"),
        (["--budget_ratio", "0.1", "--model", "no_such_model"], "model 'no_such_model' is not a local path"),
        (
            ["--budget_ratio", "0.1", "--budget_ratoi", "2"],
            "unrecognized arguments: --budget_ratoi 2; did you mean --budget_ratio?",
        ),
    ],
)
def test_trady_command_refuses_bad_arguments_before_any_work(argv, expected, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["trady", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-collapse: error: ") and expected in err and len(err.strip().splitlines()) == 1


def test_trady_command_fine_tunes_a_classifier_on_a_labelled_dataset(tiny_llm, tmp_path, capsys):
    code = main(
        [
            "trady",
            "--model",
            str(tiny_llm),
            "--task",
            "classification",
            "--budget_ratio",
            "0.1",
            "--compare_full",
            "false",
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert code == 0
    assert "test accuracy:" in capsys.readouterr().out
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert report["task"] == "classification" and report["metric_name"] == "accuracy"
    assert 0 <= report["metric_after"] <= 1 and report["train_steps"] == 4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in (config["modules_to_save"] or [])


def test_the_command_selects_channels_as_the_config_does_by_default():
    """``hf-collapse trady`` without ``--selection`` draws channels the way ``TraDyConfig()`` does: the one default
    the measurements back (docs/trady.md, "Where re-sampling pays")."""
    from dataclasses import fields

    from hf_collapse.commands.trady import TraDyJobArguments
    from hf_collapse.trady import TraDyConfig

    def default(cls):
        return next(f.default for f in fields(cls) if f.name == "selection")

    assert default(TraDyJobArguments) == default(TraDyConfig) == "static_top_rgn"

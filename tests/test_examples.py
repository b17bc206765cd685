"""Every example runs end to end with tiny settings (the same scripts scale up with flags and accelerate)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = ["--report_to", "none", "--disable_tqdm", "true", "--per_device_eval_batch_size", "128", "--use_cpu", "true"]


def run_example(script, output_dir, *args):
    command = [sys.executable, os.path.join(ROOT, "examples", script), "--output_dir", str(output_dir), *TINY, *args]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((output_dir / "report" / "report.json").read_text())
    assert (output_dir / "report" / "tradeoff.png").is_file()
    assert (output_dir / "collapsed" / "config.json").is_file()
    return report, result.stdout


@pytest.mark.slow
def test_text_example(tmp_path):
    report, out = run_example(
        "lacoot_text_classification.py",
        tmp_path,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "16",
        "--max_metric_delta",
        "0.05",
    )
    assert report["family"] == "bert" and report["metric_name"] == "accuracy"
    assert "| 0 | (original) |" in out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "swin", "mobilenet_v2"])
def test_image_example(tmp_path, arch):
    report, _ = run_example(
        "lacoot_image_classification.py",
        tmp_path,
        "--arch",
        arch,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "32",
        "--image_size",
        "16",
    )
    assert report["family"] == arch


@pytest.mark.slow
def test_dit_example(tmp_path):
    report, out = run_example(
        "lacoot_dit.py",
        tmp_path,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "16",
        "--num_layers",
        "3",
        "--num_units",
        "1",
    )
    assert report["family"] == "dit" and report["metric_name"] == "loss" and len(report["removed"]) == 1
    assert "held-out denoising loss" in out


def run_tlc_example(script, output_dir, *args):
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", script),
        "--output_dir",
        str(output_dir),
        *TINY,
        "--num_units",
        "1",
        "--finetune_steps",
        "1",
        *args,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.join(ROOT, "examples"),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "examples")},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((output_dir / "report" / "report.json").read_text())
    assert report["method"] == "TLC" and len(report["removed"]) == 1
    assert (output_dir / "compressed" / "config.json").is_file()
    return report


@pytest.mark.slow
def test_tlc_text_example(tmp_path):
    assert (
        run_tlc_example(
            "tlc_text_classification.py", tmp_path, "--max_steps", "2", "--per_device_train_batch_size", "16"
        )["family"]
        == "bert"
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["swin", "resnet"])
def test_tlc_image_example(tmp_path, arch):
    assert (
        run_tlc_example(
            "tlc_image_classification.py",
            tmp_path,
            "--arch",
            arch,
            "--max_steps",
            "2",
            "--image_size",
            "16",
            "--per_device_train_batch_size",
            "32",
        )["family"]
        == arch
    )


@pytest.mark.slow
def test_tlc_dit_example(tmp_path):
    assert (
        run_tlc_example(
            "tlc_dit.py", tmp_path, "--max_steps", "2", "--per_device_train_batch_size", "16", "--num_layers", "2"
        )["family"]
        == "dit"
    )


@pytest.mark.slow
def test_image_example_runs_unchanged_under_torchrun(tmp_path):
    """The same script, 2 DDP ranks on CPU: both ranks collapse the same way, the main process writes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "examples", "lacoot_image_classification.py"),
        "--output_dir",
        str(tmp_path),
        *TINY,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "16",
        "--image_size",
        "16",
        "--ddp_backend",
        "gloo",
        "--save_strategy",
        "no",
        "--max_metric_delta",
        "1.0",
    ]  # 3 steps leave accuracy at chance: let the budget always allow removal
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["family"] == "resnet" and report["removed"]
    assert result.stdout.count("| 0 | (original) |") == 1  # printed by the main process only


@pytest.mark.slow
def test_image_example_runs_unchanged_under_accelerate_launch(tmp_path):
    """The shipped multi-GPU accelerate config, unchanged, with 2 processes on CPU: ``--use_cpu`` makes the
    Trainer's accelerate state MULTI_CPU (gloo). The Trainer's own log proves the 2 processes (a total batch of
    2 x 16); the collapse table and the progress bars appear once, and the main process writes."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "examples", "accelerate_configs", "multi_gpu.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        os.path.join(ROOT, "examples", "lacoot_image_classification.py"),
        "--output_dir",
        str(tmp_path),
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--log_level",
        "info",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "128",
        "--image_size",
        "16",
        "--save_strategy",
        "no",
        "--max_metric_delta",
        "1.0",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.join(ROOT, "examples"),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 32" in output
    assert result.stdout.count("| 0 | (original) |") == 1
    # Each bar's first render (before any postfix says what it is doing) appears once: only one process draws it.
    assert output.count("scoring blocks (msw):   0%") == 1
    assert len(re.findall(r"collapsing:\s+0%\|[^\r\n]*\?it/s\]", output)) == 1
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["family"] == "resnet" and report["removed"]
    assert (tmp_path / "collapsed" / "config.json").is_file()

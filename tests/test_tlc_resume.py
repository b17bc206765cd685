"""TLC's compress loop writes its progress after every step and resumes from it, ending where an uninterrupted
run ends; progress from another model or config is refused."""

import json
import shutil

import pytest
import torch
from toy_training import PadOnlyCollator, accuracy, tiny_bert, toy_dataset
from transformers import TrainerCallback, TrainingArguments

import hf_collapse
from hf_collapse.report import CollapseReport
from hf_collapse.tlc import TLCConfig, compress

CONFIG = TLCConfig(num_units=3, calibration_batches=2, finetune_steps=2)


def _args(output_dir, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(
        str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=1,
        **kw,
    )


class Crash(RuntimeError):
    pass


class CrashOnFinetune(TrainerCallback):
    """Raises when the ``n``-th fine-tuning begins: the run dies in the middle of step ``n``."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen += 1
        if self.seen == self.n:
            raise Crash(f"simulated crash in fine-tuning {self.n}")


def _run(output_dir, model=None, config=CONFIG, args=None, **kw):
    return compress(
        model or tiny_bert(),
        config,
        toy_dataset(),
        toy_dataset(8, seed=1),
        args or _args(output_dir),
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
        **kw,
    )


def _logits(model):
    batch = PadOnlyCollator()([toy_dataset(4, seed=2)[i] for i in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits


def _without_timings(report):
    """The report without what timing measures (latencies, speed-ups and their spreads)."""
    data = report.to_dict()
    for part in data["steps"] + [data["summary"]]:
        for key in [k for k in part if "latency" in k]:
            part.pop(key)
    return data


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The progress folder of a run that crashed during the fine-tuning of step 2 (step 1 finished)."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(Crash):
        _run(out, callbacks=[CrashOnFinetune(2)])
    return out / "tlc_progress"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    # Checkpoints of the fine-tuning between steps must not pile up in the output_dir (each step would
    # overwrite the last one's checkpoint-N with another architecture).
    model, report = _run(out, args=_args(out, save_strategy="steps", save_steps=1))
    assert sorted(p.name for p in out.iterdir()) == ["tlc_progress"]
    return model, report, out / "tlc_progress"


def test_progress_is_written_after_every_step(interrupted):
    state = json.loads((interrupted / "progress.json").read_text())
    assert state["format"] == "hf_collapse.progress" and state["status"] == "running" and state["step"] == 1
    assert [e["op"] for e in state["edits"]] == ["linearize"] and len(state["search"]["remaining"]) == 2
    assert state["edits"][0]["site"] not in state["search"]["remaining"]
    assert sorted(p.name for p in interrupted.iterdir()) == [
        "progress.json",
        "report.json",
        "weights-step1.safetensors",
    ]
    report = CollapseReport.load(interrupted)  # the report so far, readable while the run is unfinished
    assert len(report.steps) == 2 and report.steps[1].unit == state["edits"][0]["site"]


def test_resumed_run_ends_where_the_uninterrupted_run_ends(interrupted, uninterrupted, tmp_path):
    expected_model, expected_report, expected_folder = uninterrupted
    folder = tmp_path / "progress"
    shutil.copytree(interrupted, folder)
    model, report = _run(tmp_path, resume_from=folder)
    assert len(report.steps) == 4 and report.after.removed == 3
    assert hf_collapse.collapse_record(model) == hf_collapse.collapse_record(expected_model)
    assert _without_timings(report) == _without_timings(expected_report)
    torch.testing.assert_close(_logits(model), _logits(expected_model), atol=1e-5, rtol=0)
    expected_state = expected_model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[name], atol=1e-5, rtol=0)
    # A finished run leaves the returned report and the final weights (no checkpoints): resuming it again gives its
    # result back, without a step more (what a job does when a later phase, such as measuring, failed).
    for run_folder, run_report in ((folder, report), (expected_folder, expected_report)):
        assert sorted(p.name for p in run_folder.iterdir()) == [
            "progress.json",
            "report.json",
            "weights-step3.safetensors",
        ]
        assert CollapseReport.load(run_folder).to_dict() == run_report.to_dict()
        assert json.loads((run_folder / "progress.json").read_text())["status"] == "finished"
    again, again_report = _run(tmp_path, resume_from=folder)
    assert again_report.to_dict() == report.to_dict()
    torch.testing.assert_close(_logits(again), _logits(expected_model), atol=1e-5, rtol=0)


def test_progress_of_another_model_or_config_is_refused(interrupted, tmp_path):
    with pytest.raises(ValueError, match="model's weights differ"):
        _run(tmp_path / "a", model=tiny_bert(seed=1), resume_from=interrupted)
    with pytest.raises(ValueError, match=r"search's settings differ \(finetune_steps: 2 then, 1 now\)"):
        _run(
            tmp_path / "b",
            config=TLCConfig(num_units=3, calibration_batches=2, finetune_steps=1),
            resume_from=interrupted,
        )
    with pytest.raises(ValueError, match="holds no collapse progress"):
        _run(tmp_path / "c", resume_from=tmp_path)
    # A fresh run never overwrites an unfinished one.
    with pytest.raises(ValueError, match="holds an unfinished run: pass resume_from"):
        _run(tmp_path / "d", progress_dir=interrupted)
    assert json.loads((interrupted / "progress.json").read_text())["step"] == 1

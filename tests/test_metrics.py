"""Measurement: parameter counts, FLOPs (checked against the analytic count) and latency."""

import json
import os

import pytest
import torch
from tiny_models import CASES_BY_NAME

import hf_collapse
from hf_collapse import metrics


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_flops_match_the_analytic_count():
    model = TwoLinears()
    inputs = {"x": torch.randn(3, 8)}
    total, per_module = metrics.module_flops(model, inputs, ["first", "second"])
    assert per_module == {"first": 2 * 3 * 8 * 16, "second": 2 * 3 * 16 * 4}
    assert total == metrics.forward_flops(model, inputs) == sum(per_module.values())
    with pytest.raises(ValueError, match=r"no module at \['third'\]"):
        metrics.module_flops(model, inputs, ["first", "third"])


def test_format_count_rounds_into_the_next_unit():
    from hf_collapse.report import format_count

    assert [format_count(v) for v in (512, 22_713_216, 999_950, 999_949)] == ["512", "22.7M", "1.0M", "999.9K"]


def test_parameter_count():
    model = TwoLinears()
    assert metrics.count_parameters(model) == 8 * 16 + 16 + 16 * 4 + 4
    model.first.requires_grad_(False)
    assert metrics.count_parameters(model, trainable_only=True) == 16 * 4 + 4


def test_removing_a_block_removes_its_flops_and_parameters():
    model = CASES_BY_NAME["bert"].build()
    inputs = metrics.example_inputs(model, batch_size=2, seq_len=16)
    assert inputs["input_ids"].shape == (2, 16)
    block = hf_collapse.find_blocks(model)[2]
    total, per_block = metrics.module_flops(model, inputs, [block.path])
    collapsed = hf_collapse.remove_blocks(model, [block])
    assert metrics.forward_flops(collapsed, inputs) == total - per_block[block.path]
    assert metrics.count_parameters(collapsed) == metrics.count_parameters(model) - block.params


@pytest.mark.parametrize("case_name", ["swin", "resnet_basic", "dit", "unet", "llama"])
def test_example_inputs_run_every_family(case_name):
    model = CASES_BY_NAME[case_name].build()
    assert metrics.forward_flops(model, metrics.example_inputs(model, batch_size=2, seq_len=8)) > 0


def test_latency_is_a_positive_median():
    model = TwoLinears()
    seconds = metrics.measure_latency(model, {"x": torch.randn(4, 8)}, warmup=1, repeats=5)
    assert 0 < seconds < 1
    with pytest.raises(ValueError, match="repeats"):
        metrics.measure_latency(model, {"x": torch.randn(4, 8)}, repeats=0)
    assert metrics.hardware_description()


class Repeated(torch.nn.Module):
    """The same linear map applied `times` times: its latency scales with `times`."""

    def __init__(self, times):
        super().__init__()
        self.linear = torch.nn.Linear(256, 256)
        self.times = times

    def forward(self, x):
        for _ in range(self.times):
            x = self.linear(x)
        return x


def test_compare_latency_times_models_side_by_side():
    inputs = {"x": torch.randn(64, 256)}
    slow, fast = Repeated(16).train(), Repeated(1).eval()
    timing = metrics.compare_latency([slow, fast], inputs, rounds=5, min_seconds=0.005)
    assert timing.rounds == 5 and len(timing.seconds) == len(timing.speedups) == len(timing.spreads) == 2
    assert timing.speedups[0] == 1.0 and timing.spreads[0] == (1.0, 1.0) and not timing.significant(0)
    assert timing.speedups[1] > 2 and timing.significant(1)  # 16x the work: measurably slower, even under load
    low, high = timing.spreads[1]
    assert low <= timing.speedups[1] <= high
    assert slow.training and not fast.training  # modes restored
    with pytest.raises(ValueError, match="rounds"):
        metrics.compare_latency([fast], inputs, rounds=0)


def test_speedup_wording_says_when_the_spread_makes_it_meaningless():
    from hf_collapse.report import describe_speedup

    assert (
        describe_speedup({"latency_speedup": 1.46, "latency_spread": [1.41, 1.52], "latency_significant": True})
        == "1.46x faster (1.41-1.52)"
    )
    assert (
        describe_speedup({"latency_speedup": 0.35, "latency_spread": [0.2, 1.3], "latency_significant": False})
        == "no measurable change (x0.35, 0.20-1.30)"
    )
    assert describe_speedup({"latency_speedup": 1.5, "latency_spread": None}) == "1.50x faster"
    assert describe_speedup({"latency_speedup": None}) == ""


def test_collapse_reports_each_state_side_by_side_with_the_original():
    model = CASES_BY_NAME["bert"].build()
    scores = {b.name: float(i) for i, b in enumerate(hf_collapse.find_blocks(model))}
    _, report = hf_collapse.collapse(model, scores, num_units=2, latency_repeats=3, progress=False)
    for step in report.steps[1:]:
        assert step.latency_speedup > 0 and step.reference_latency_s > 0 and step.latency_s > 0
        assert step.latency_spread[0] <= step.latency_speedup <= step.latency_spread[1]
        assert step.latency_significant in (True, False)
    summary = report.summary()
    assert summary["latency_speedup"] == report.after.latency_speedup
    assert summary["latency_s_before"] == report.after.reference_latency_s
    again = hf_collapse.CollapseReport.from_dict(json.loads(report.to_json()))
    assert again.steps[-1].latency_spread == report.steps[-1].latency_spread
    assert "speed-up (side by side)" in report.to_markdown()


def test_hardware_description_names_the_device_the_model_is_on():
    assert metrics.hardware_description(TwoLinears()).startswith("CPU (")
    assert metrics.hardware_description("cpu").startswith("CPU (")


@pytest.mark.slow
def test_reported_latencies_match_the_models_timed_alone_in_a_fresh_process(tmp_path):
    """The latency in a collapse report is what the model takes on its own (within 1.5x of a fresh process timing the
    saved model), and a state with fewer FLOPs is never reported measurably slower than the original."""
    import subprocess
    import sys

    model = CASES_BY_NAME["bert"].build()
    inputs = metrics.example_inputs(model, batch_size=8, seq_len=32)
    scores = {b.name: float(i) for i, b in enumerate(hf_collapse.find_blocks(model))}
    collapsed, report = hf_collapse.collapse(
        model, scores, num_units=3, example_inputs=inputs, latency_repeats=7, progress=False
    )
    for step in report.steps[1:]:
        assert step.flops < report.before.flops
        assert not (step.latency_speedup < 1 and step.latency_significant), step
    model.save_pretrained(tmp_path / "original")
    collapsed.save_pretrained(tmp_path / "collapsed")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch, json; from transformers import AutoModelForSequenceClassification as M\n"
        "from hf_collapse.metrics import measure_latency\n"
        "inputs = torch.load(sys.argv[1] + '/inputs.pt')\n"
        "print(json.dumps({n: measure_latency(M.from_pretrained(sys.argv[1] + '/' + n).eval(), inputs, warmup=3,"
        " repeats=15) for n in ('original', 'collapsed')}))\n"
    )
    reported = {"original": report.summary()["latency_s_before"], "collapsed": report.after.latency_s}
    for _attempt in range(2):  # a second fresh process if another job on the machine disturbed the first
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        alone = json.loads(result.stdout.strip().splitlines()[-1])
        within = all(1 / 1.5 <= reported[name] / alone[name] <= 1.5 for name in reported)
        if within:
            break
    assert within, (reported, alone)


def test_the_plot_says_everything_it_draws():
    """A legend entry for every line (metric, rejected step, budget, latency), below the axes, never over the data."""
    import matplotlib.pyplot as plt

    model = CASES_BY_NAME["bert"].build()
    scores = {b.name: float(i) for i, b in enumerate(hf_collapse.find_blocks(model))}
    values = iter([0.8, 0.78, 0.6])
    _, report = hf_collapse.collapse(
        model,
        scores,
        max_metric_delta=0.05,
        eval_fn=lambda m: next(values),
        metric_name="accuracy",
        latency_repeats=1,
        progress=False,
    )
    fig = report.figure()
    try:
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == [
            "accuracy",
            "rejected (over budget)",
            "budget (-0.05)",
            "latency (ms)",
        ]
        assert all(ax.get_legend() is None for ax in fig.axes)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert legend.get_window_extent(renderer).y1 <= min(ax.get_window_extent(renderer).y0 for ax in fig.axes)
        budget_lines = [line for line in fig.axes[0].get_lines() if line.get_label() == "budget (-0.05)"]
        assert budget_lines and budget_lines[0].get_ydata()[0] == pytest.approx(0.75)
    finally:
        plt.close(fig)


def test_counting_flops_leaves_a_training_model_untouched():
    """FLOPs are counted in eval mode: BatchNorm statistics stay as they were (and batch size 1 is fine)."""
    model = CASES_BY_NAME["mobilenet_v2"].build().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert metrics.forward_flops(model, metrics.example_inputs(model, batch_size=1)) > 0
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compare_latency_times_any_call_side_by_side():
    """``call`` times something else than a forward pass (generation, here), with the same interleaved rounds."""
    inputs = {"x": torch.randn(64, 256)}
    calls = []
    timing = metrics.compare_latency(
        [Repeated(8), Repeated(1)],
        inputs,
        rounds=3,
        warmup=1,
        min_seconds=0,
        call=lambda model, x: calls.append(model.times) or model(**x),
    )
    assert calls.count(1) == 4  # one warm-up pass and three rounds
    assert calls.count(8) == 5  # the reference also has the pass that sizes the batching
    assert timing.speedups[1] > 1

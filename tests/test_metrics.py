"""Measurement: parameter counts, FLOPs (checked against the analytic count) and latency."""

import pytest
import torch

import hf_collapse
from hf_collapse import metrics
from tiny_models import CASES_BY_NAME


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

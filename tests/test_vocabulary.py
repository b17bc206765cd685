"""One vocabulary for budgets and tokens, with the spellings of hf_collapse 0.1 kept as deprecated aliases for one
release: each still works, says what replaces it (a FutureWarning, shown to users by default), and gives the same
result as the new name."""

import json

import pytest
import torch
from tiny_models import CASES_BY_NAME

import hf_collapse
from hf_collapse.budget import Budget
from hf_collapse.report import CollapseReport


def test_collapse_takes_the_old_budget_names_with_a_warning():
    model = CASES_BY_NAME["bert"].build()
    scores = {b.name: float(i) for i, b in enumerate(hf_collapse.find_blocks(model))}
    _, new = hf_collapse.collapse(model, scores, num_units=2, latency_repeats=0, progress=False)
    with pytest.warns(FutureWarning, match="'num_blocks' is deprecated.*use 'num_units'"):
        _, old = hf_collapse.collapse(model, scores, num_blocks=2, latency_repeats=0, progress=False)
    assert [s.unit for s in old.steps] == [s.unit for s in new.steps] and old.budget == {"num_units": 2}
    values = iter([1.0, 0.9, 0.7])
    with pytest.warns(FutureWarning, match="'max_metric_drop' is deprecated.*use 'max_metric_delta'"):
        _, report = hf_collapse.collapse(
            model, scores, max_metric_drop=0.15, eval_fn=lambda m: next(values), latency_repeats=0, progress=False
        )
    assert report.budget == {"max_metric_delta": 0.15} and [s.kept for s in report.steps] == [True, True, False]
    with pytest.raises(ValueError, match="max_metric_delta is given twice with different values"):
        hf_collapse.collapse(model, scores, max_metric_delta=0.1, max_metric_drop=0.2, eval_fn=float)


def test_budget_reads_the_old_report_keys():
    budget = Budget.from_dict({"num_blocks": 3, "max_metric_increase": 2.0}, higher_is_better=False)
    assert budget == Budget(num_units=3, max_metric_delta=2.0, higher_is_better=False)
    old = CollapseReport(
        method="collapse",
        model_class="transformers.BertModel",
        family="bert",
        budget={"num_blocks": 2, "max_metric_drop": 0.05},
    )
    old.steps.append(
        hf_collapse.CollapseStep(removed=0, unit=None, score=None, metric=0.8, params=1, flops=1, latency_s=None)
    )
    assert old._metric_limits() == [(pytest.approx(0.75), "budget (-0.05)")]


def test_tlc_and_trady_configs_take_the_old_names_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="TLCConfig: 'target_layers' is deprecated"):
        config = hf_collapse.TLCConfig(target_layers=2, max_metric_drop=0.1)
    assert (config.num_units, config.max_metric_delta, config.target_layers, config.max_metric_drop) == (
        2,
        0.1,
        None,
        None,
    )
    from hf_collapse.trady import TraDyConfig

    with pytest.warns(FutureWarning, match="TraDyConfig: 'memory_budget' is deprecated.*'budget_elements'"):
        trady = TraDyConfig(memory_budget=3000)
    assert trady.budget_elements == 3000 and trady.memory_budget is None
    # An adapter_config.json written by hf_collapse 0.1 (with memory_budget) still loads.
    saved = TraDyConfig(budget_elements=3000).to_dict()
    saved["memory_budget"], saved["budget_elements"] = 3000, None
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(FutureWarning, match="memory_budget"):
        loaded = TraDyConfig.from_pretrained(str(tmp_path))
    assert loaded.budget_elements == 3000 and loaded.budget_description == "3000 elements"


def test_lm_windows_takes_window_with_a_warning():
    from transformers import AutoTokenizer

    from hf_collapse.data import embedded_model_path, lm_windows

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("minilm"))
    texts = ["one two three four five six seven eight nine ten eleven twelve"] * 4
    with pytest.warns(FutureWarning, match="lm_windows: 'window' is deprecated.*'max_length'"):
        old = lm_windows(texts, tokenizer, window=6)
    new = lm_windows(texts, tokenizer, max_length=6)
    assert len(old) == len(new) > 1 and all(torch.equal(a, b) for a, b in zip(old["input_ids"], new["input_ids"]))


def test_the_commands_take_the_old_flags_with_a_warning():
    from transformers import TrainingArguments

    from hf_collapse.commands.arguments import parse_job_flags
    from hf_collapse.commands.prune import PruneJobArguments

    argv = ["--num_blocks", "4", "--max_metric_increase", "2.5", "--window=64", "--output_dir", "out"]
    with pytest.warns(FutureWarning, match="--num_blocks is deprecated.*use --num_units"):
        job, _ = parse_job_flags("hf-collapse prune", "", PruneJobArguments, TrainingArguments, {}, argv)
    assert (job.num_units, job.max_metric_delta, job.max_length) == (4, 2.5, 64)

"""One registry per extension point, and one contract for every entry of it: each registered scorer, search and
healing method is run here on a tiny Llama and must do what its kind promises (as peft's common tester runs every
tuner). Adding one is one file and one registration: the toys of ``toy_extensions.py`` are then offered by
``score_blocks``, ``prune`` and ``heal``, listed by ``hf-collapse prune --help``, and pass the same contract."""

from __future__ import annotations

import math

import pytest
import torch
from toy_extensions import LastBlocksFirst, OutputNorm, ScaleOutputs, registered_toys
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import hf_collapse
from hf_collapse.commands import main
from hf_collapse.healing import HEALING, check_heal_applicable
from hf_collapse.registry import Registry
from hf_collapse.scoring import SCORERS
from hf_collapse.searches import SEARCHES, find_search
from hf_collapse.surgery import collapse_record, find_blocks


def _tiny_llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


def _batches(labels: bool = True, count: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 64, (2, 8), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batches.append({**batch, "labels": ids} if labels else batch)
    return batches


def _forward_passes(model, run) -> tuple[object, int]:
    """``run()``'s result and how many times it called ``model``'s forward."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


def check_scorer(scorer) -> None:
    """A scorer scores every unit, deterministically, at the cost it declares, on the data it says it needs."""
    model = _tiny_llama()
    units = [b.name for b in find_blocks(model) if b.removable]
    batches = _batches(labels=scorer.needs_labels) if scorer.needs_data else None
    scores, passes = _forward_passes(
        model, lambda: hf_collapse.score_blocks(model, batches, method=scorer.name, progress=False)
    )
    assert list(scores) == units and all(math.isfinite(v) for v in scores.values())
    assert scores == hf_collapse.score_blocks(model, batches, method=scorer.name, progress=False)
    assert passes == scorer.forward_passes(len(units), len(batches or [])), "the declared cost is the measured one"
    if scorer.needs_data:
        with pytest.raises(ValueError, match="pass a dataloader"):
            hf_collapse.score_blocks(model, None, method=scorer.name)
    assert scorer.description  # what --help shows


def check_search(search) -> None:
    """A search removes what the budget asks, of the kind it declares, recorded so that the model reloads."""
    model = _tiny_llama()
    batches = _batches(labels=search.needs_labels)
    smaller, report = hf_collapse.prune(model, batches, method=search.name, num_units=1, latency_repeats=0)
    assert report.after.removed == 1 and report.stopped_by == "num_units" and report.budget_met
    (removed,) = [u for step in report.kept_steps[1:] for u in step.unit.split(", ")]
    is_sublayer = removed.endswith((".self_attn", ".mlp"))
    assert is_sublayer == (search.removes == "sub-layers") or not is_sublayer
    assert collapse_record(smaller) is not None and len(collapse_record(smaller)["edits"]) == 1
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    if search.chooses_units:
        with pytest.raises(ValueError, match="chooses its own units"):
            hf_collapse.prune(model, batches, method=search.name, num_units=1, granularity="attention")
    assert search.description


def check_healing(method, tmp_path) -> None:
    """A healing method heals a copy: the student and the teacher are untouched, the healed model keeps the
    student's class and record, and what it needs is said before any work."""
    teacher = _tiny_llama()
    student = hf_collapse.remove_blocks(teacher, ["model.layers.2"])
    data = [{k: v[0] for k, v in batch.items()} for batch in _batches()] * 4
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True)
    healed = hf_collapse.heal(student, teacher, data, method=method.name, args=args)
    assert type(healed) is type(student) and collapse_record(healed) == collapse_record(student)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())
    if method.trains:
        with pytest.raises(ValueError, match="trains: pass args"):
            hf_collapse.heal(student, teacher, data, method=method.name)
    if method.needs_teacher({}):
        with pytest.raises(ValueError, match="needs the uncollapsed teacher"):
            hf_collapse.heal(student, None, data, method=method.name, args=args)
    if method.whole_blocks_only:
        with pytest.raises(ValueError, match="heals removals of whole blocks"):
            check_heal_applicable(method.name, sublayers=True)
    assert method.description


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_registered_scorer_honours_the_contract(name):
    check_scorer(SCORERS.get(name))


@pytest.mark.parametrize("name", [*SEARCHES, *SCORERS])
def test_every_registered_search_honours_the_contract(name):
    check_search(find_search(name))  # a scorer is a one-shot search


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEALING))
def test_every_registered_healing_method_honours_the_contract(name, tmp_path):
    check_healing(HEALING.get(name), tmp_path)


def test_a_new_scorer_search_and_healing_method_are_one_file_and_one_registration(tmp_path, capsys):
    with registered_toys():
        check_scorer(SCORERS.get(OutputNorm.name))
        check_search(find_search(OutputNorm.name))
        check_search(SEARCHES.get(LastBlocksFirst.name))
        check_healing(HEALING.get(ScaleOutputs.name), tmp_path)
        smaller, report = hf_collapse.prune(_tiny_llama(), _batches(), method=LastBlocksFirst.name, num_units=2)
        assert [s.unit for s in report.steps[1:]] == ["model.layers.3", "model.layers.2"]
        with pytest.raises(SystemExit):
            main(["prune", "--help"])
        shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
        for toy in (OutputNorm, LastBlocksFirst, ScaleOutputs):
            assert f"{toy.name} ({toy.description})" in shown
        assert main(["prune", "--num_units", "1", "--method", "toy_last_first", "--granularity", "mlp"]) == 2
        assert "chooses its own units" in capsys.readouterr().err  # refused by the search itself, before any work
    assert OutputNorm.name not in SCORERS and "toy_last_first" not in SEARCHES and "toy_rescale" not in HEALING


def test_a_registry_refuses_what_it_cannot_take():
    registry = Registry("widget", how="add one with WIDGETS.register(...)")
    with pytest.raises(ValueError, match="needs a non-empty `name`"):
        registry.register(object())
    entry = type("Widget", (), {"name": "w", "description": "a widget"})()
    registry.register(entry)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(entry)
    assert registry.register(entry, replace=True) is entry and registry.describe() == "w (a widget)"
    with pytest.raises(ValueError, match=r"unknown widget 'v'; accepted: w \(add one with WIDGETS.register"):
        registry.get("v")
    with pytest.raises(ValueError, match="unknown pruning method 'magic'; accepted: "):
        find_search("magic")

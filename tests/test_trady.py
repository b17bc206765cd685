"""TraDy as a peft method: registration, custom autograd, cost model, selection, savings, Trainer, reload."""

import copy
import json
import re

import pytest
import tiny_models
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from torch import nn
from toy_training import PadOnlyCollator, tiny_bert, toy_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.pytorch_utils import Conv1D

from hf_collapse import profiling as memory
from hf_collapse import trady
from hf_collapse.trady import (
    SELECTIONS,
    ChannelSliceFunction,
    LayerCost,
    TraDyCallback,
    TraDyConfig,
    TraDyLayer,
    calibrate,
    find_trady_model,
    memory_report,
)
from hf_collapse.trady.layer import channel_ops_for
from hf_collapse.trady.selection import (
    budget_elements,
    candidate_layers,
    draw_random_channels,
    draw_top_rgn_channels,
    flat_capacity,
    select_layers_by_rgn,
    selection_generator,
)


def bert_batch(batch=4, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=g)}


def trady_bert(seed=0, **config):
    torch.manual_seed(seed)
    model = tiny_models.bert().train()
    settings = dict(task_type="SEQ_CLS", budget_ratio=0.1)
    settings.update(config)
    peft_model = get_peft_model(model, TraDyConfig(**settings))
    calibrate(peft_model, [bert_batch(seed=s) for s in range(2)])
    return peft_model


def effective_weights(peft_model):
    tuner = find_trady_model(peft_model)
    return {
        name: (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach().clone()
        for name, layer in tuner.trady_layers().items()
    }


# ----------------------------------------------------------------------------------------------- registration


def test_trady_is_a_registered_peft_method():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType("TRADY") is PeftType.TRADY and PeftType.TRADY in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TRADY"] is TraDyConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TRADY] is trady.TraDyModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TRADY] == "trady_"
    trady.register_trady_with_peft()  # idempotent
    assert list(PeftType).count(PeftType.TRADY) == 1
    assert TraDyConfig().peft_type is PeftType.TRADY


# ----------------------------------------------------------------------------------------------- custom autograd


def _modules():
    torch.manual_seed(0)
    conv1d = Conv1D(7, 6)
    return [
        ("linear", nn.Linear(6, 5), torch.randn(2, 4, 6)),
        ("conv1d", conv1d, torch.randn(2, 4, 6)),
        ("conv2d", nn.Conv2d(6, 4, 3, stride=2, padding=1, dilation=1), torch.randn(2, 6, 9, 9)),
        ("conv2d_dilated", nn.Conv2d(6, 4, (3, 1), padding=(2, 0), dilation=2), torch.randn(2, 6, 7, 7)),
        ("depthwise", nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.randn(2, 6, 8, 8)),
        ("depthwise_x2", nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6), torch.randn(2, 6, 8, 8)),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _modules()])
def test_custom_autograd_matches_full_backward_on_selected_slices(case):
    name, module, x = _modules()[case]
    ops = channel_ops_for(module)
    index = torch.tensor([0, 2, 5])
    torch.manual_seed(1)
    delta = (0.1 * torch.randn(ops.slice_shape(3))).requires_grad_(True)
    weight = module.weight.detach()
    grad_out = None

    # reference: a dense weight with the delta merged, full autograd
    dense = ops.effective_weight(weight, delta.detach(), index).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ops.forward(x_ref, dense, module.bias.detach())
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)

    x_new = x.clone().requires_grad_(True)
    y = ChannelSliceFunction.apply(x_new, weight, module.bias.detach(), delta, index, ops)
    y.backward(grad_out)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.grad, ops.read_slice(dense.grad, index), rtol=1e-5, atol=1e-6)


def test_custom_autograd_saves_only_the_selected_channels():
    module, x = nn.Linear(64, 32), torch.randn(3, 5, 64, requires_grad=True)
    ops = channel_ops_for(module)
    index = torch.arange(4)
    delta = torch.zeros(ops.slice_shape(4), requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ChannelSliceFunction.apply(x, module.weight.detach(), None, delta, index, ops)
    activations = [t for t in saved if t.shape[:2] == (3, 5)]
    assert [tuple(t.shape) for t in activations] == [(3, 5, 4)]  # not (3, 5, 64)
    # an input that needs no gradient (below the lowest selected layer): no input gradient is computed
    y = ChannelSliceFunction.apply(x.detach(), module.weight.detach(), None, delta, index, ops)
    y.sum().backward()
    assert delta.grad is not None and delta.grad.shape == (32, 4)


# ----------------------------------------------------------------------------------------------- cost model


def test_cost_model_and_budget():
    costs = [LayerCost("conv", 8, 4 * 9, 16.0), LayerCost("fc", 10, 3, 5.0)]
    assert costs[0].channel_cost == 36 + 16 and costs[1].channel_cost == 8
    assert budget_elements(costs, None, 0.5) == 0.5 * (8 * 52 + 10 * 8)
    assert budget_elements(costs, 123, None) == 123.0
    assert candidate_layers(["a", "b", "c"], 2) == ["b", "c"] and candidate_layers(["a"], None) == ["a"]


def test_layer_ranking_covers_the_cumulative_rgn():
    rgn = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 1.0}
    assert select_layers_by_rgn(rgn, 0.5) == ["b"]
    assert select_layers_by_rgn(rgn, 0.8) == ["b", "c"]  # 8/10
    assert select_layers_by_rgn(rgn, 0.85) == ["a", "b", "c"]  # ties in forward order; returned in forward order
    assert select_layers_by_rgn(rgn, 0.8, allowed=["c", "d"]) == ["c", "d"]


def test_random_draws_fill_the_budget_and_depend_only_on_seed_and_index():
    costs = [LayerCost("a", 40, 10, 6.0), LayerCost("b", 30, 20, 6.0), LayerCost("c", 50, 5, 1.0)]
    budget = 0.2 * sum(c.full_cost for c in costs)
    capacity = flat_capacity(costs, budget)
    first = draw_random_channels(costs, budget, capacity, selection_generator(0, 3))
    again = draw_random_channels(costs, budget, capacity, selection_generator(0, 3))
    other = draw_random_channels(costs, budget, capacity, selection_generator(0, 4))
    assert first == again and first != other
    by_name = {c.name: c for c in costs}
    used = sum(len(ch) * by_name[n].channel_cost for n, ch in first.items())
    assert budget - min(c.channel_cost for c in costs) < used <= budget
    assert sum(len(ch) * by_name[n].weight_per_channel for n, ch in first.items()) <= capacity
    assert all(ch == sorted(set(ch)) and max(ch) < by_name[n].in_channels for n, ch in first.items())
    # uniform over the pooled channels: every layer gets roughly its share over many draws
    counts = {n: 0 for n in by_name}
    for i in range(200):
        for n, ch in draw_random_channels(costs, budget, capacity, selection_generator(1, i)).items():
            counts[n] += len(ch)
    shares = {n: counts[n] / 200 / by_name[n].in_channels for n in counts}
    assert max(shares.values()) / min(shares.values()) < 1.3


def test_deterministic_rgn_draw_takes_the_highest_channels():
    costs = [LayerCost("a", 4, 2, 1.0), LayerCost("b", 3, 2, 1.0)]
    rgn = {"a": torch.tensor([0.1, 0.9, 0.2, 0.0]), "b": torch.tensor([0.5, 0.3, 0.95])}
    assert draw_top_rgn_channels(costs, rgn, budget=9.0, capacity=100) == {"a": [1], "b": [0, 2]}


# ----------------------------------------------------------------------------------------------- the peft method


def test_only_selected_channels_of_selected_layers_change_after_a_step():
    model = trady_bert(budget_ratio=0.05)
    tuner = find_trady_model(model)
    selected_layers = set(model.peft_config["default"].selected_layers)
    assert 0 < len(selected_layers) < len(tuner.trady_layers())
    selection = tuner.current_selection()
    assert set(selection) <= selected_layers
    before_weights = effective_weights(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n and p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == tuner.trady_flat["default"].numel() + sum(
        p.numel() for p in head_before.values()
    )
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(**bert_batch()).loss.backward()
    optimizer.step()
    after_weights = effective_weights(model)
    for name, before in before_weights.items():
        changed = (after_weights[name] != before).any(dim=0).nonzero().flatten().tolist()
        assert changed == selection.get(name, []), name  # exactly the selected input channels, nothing else
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert any(not torch.equal(dict(model.named_parameters())[n], b) for n, b in head_before.items())


def test_resampling_merges_the_update_and_changes_the_selection():
    model = trady_bert(selection="rgn_weighted")  # a selection that re-draws
    tuner = find_trady_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model(**bert_batch()).loss.backward()
    optimizer.step()
    flat = tuner.trady_flat["default"]
    assert flat in optimizer.state
    first = tuner.current_selection()
    eval_batch = bert_batch(seed=5)
    model.eval()
    with torch.no_grad():
        before = model(**eval_batch).logits
    weights = effective_weights(model)
    assert tuner.resample(1, optimizer) is True
    with torch.no_grad():
        after = model(**eval_batch).logits
    assert torch.equal(before, after)  # merging is exact: the function did not move
    assert torch.count_nonzero(flat) == 0 and flat not in optimizer.state  # optimizer state reset
    assert tuner.current_selection() != first
    for name, weight in effective_weights(model).items():
        assert torch.equal(weight, weights[name])
        layer = tuner.trady_layers()[name]
        assert layer.trady_merged["default"].nonzero().flatten().tolist() == first.get(name, [])
    assert [index for index, _ in tuner.selection_history()] == [0, 1]


def test_strategies_static_full_random_and_det_rgn():
    static = trady_bert(selection="static_topk_random")
    tuner = find_trady_model(static)
    first = tuner.current_selection()
    assert tuner.resample(1) is False and tuner.current_selection() == first

    full = trady_bert(selection="full_random", budget_ratio=0.3)
    tuner = find_trady_model(full)
    assert full.peft_config["default"].selected_layers is None
    assert [c.name for c in tuner.sampler().pool] == list(tuner.trady_layers())

    det = trady_bert(selection="det_rgn")
    tuner = find_trady_model(det)
    for name, channels in tuner.current_selection().items():
        rgn = tuner.trady_layers()[name].trady_rgn["default"]
        others = [c for c in range(len(rgn)) if c not in channels]
        # same-cost channels: a selected channel never has a lower RGN than an unselected one of its layer
        if others:
            assert rgn[channels].min() >= rgn[others].max() or len(channels) == len(rgn)


def test_static_top_rgn_keeps_det_rgns_first_choice():
    """``static_top_rgn``: the top calibrated-RGN channels, the very choice ``det_rgn`` starts from, kept at every
    later epoch, and it declares no RGN refresh (the callback re-measures only for strategies that ask: outside the
    budget)."""
    static = SELECTIONS.get("static_top_rgn")
    assert static.needs_channel_rgn and not static.refreshes_rgn and SELECTIONS.get("det_rgn").refreshes_rgn
    det = find_trady_model(trady_bert(selection="det_rgn")).current_selection()
    tuner = find_trady_model(trady_bert(selection="static_top_rgn"))
    assert tuner.current_selection() == det
    for epoch in (1, 2):
        assert tuner.resample(epoch) is False and tuner.current_selection() == det


def test_static_rgn_weighted_keeps_the_first_importance_weighted_draw():
    """The static counterpart of ``rgn_weighted``: the same draw as its first one, kept at every later index, so that
    a sweep can tell the value of re-sampling from the value of drawing by importance."""
    from hf_collapse.trady.selection import LayerCost
    from hf_collapse.trady.strategies import SELECTIONS

    dynamic, static = SELECTIONS.get("rgn_weighted"), SELECTIONS.get("static_rgn_weighted")
    costs = [LayerCost("a", 50, 4, 4.0), LayerCost("b", 50, 4, 4.0)]
    rgn = {"a": torch.linspace(0.01, 1.0, 50), "b": torch.linspace(0.01, 1.0, 50).flip(0)}
    first = dynamic.draw(costs, 80.0, 1000, 0, 0, lambda: rgn)
    assert all(static.draw(costs, 80.0, 1000, 0, i, lambda: rgn) == first for i in range(5))
    assert any(dynamic.draw(costs, 80.0, 1000, 0, i, lambda: rgn) != first for i in range(1, 5))
    assert static.needs_channel_rgn and static.ranks_layers

    tuner = find_trady_model(trady_bert(selection="static_rgn_weighted"))
    kept = tuner.current_selection()
    assert tuner.resample(1) is False and tuner.current_selection() == kept


def test_rgn_weighted_draws_important_channels_more_often_and_stays_in_budget():
    """MeDyate-style sampling: without replacement, probability proportional to the calibrated channel RGN."""
    from hf_collapse.trady.selection import LayerCost
    from hf_collapse.trady.strategies import SELECTIONS

    strategy = SELECTIONS.get("rgn_weighted")
    costs = [LayerCost("a", 50, 4, 4.0), LayerCost("b", 50, 4, 4.0)]  # every channel costs 8 elements
    rgn = {"a": torch.linspace(0.01, 1.0, 50), "b": torch.linspace(0.01, 1.0, 50).flip(0)}
    counts = torch.zeros(100)
    for index in range(300):
        drawn = strategy.draw(costs, 80.0, 1000, seed=0, index=index, rgn=lambda: rgn)
        assert sum(len(c) for c in drawn.values()) == 10  # 10 channels of 8 elements fill the budget of 80
        for layer, channels in drawn.items():
            counts[[(0 if layer == "a" else 50) + c for c in channels]] += 1
    weights = torch.cat([rgn["a"], rgn["b"]])
    top, bottom = weights.argsort()[-10:], weights.argsort()[:10]
    assert counts[top].mean() > 5 * counts[bottom].mean() > 0  # favoured, and the others still get their turn
    assert strategy.draw(costs, 80.0, 1000, 0, 7, lambda: rgn) == strategy.draw(costs, 80.0, 1000, 0, 7, lambda: rgn)

    model = trady_bert(selection="rgn_weighted")
    tuner = find_trady_model(model)
    assert all(layer.trady_rgn.get("default") is not None for layer in tuner.trady_layers().values())
    assert [c.name for c in tuner.sampler().pool] == [
        n for n in tuner.trady_layers() if n in model.peft_config["default"].selected_layers
    ]
    first = tuner.current_selection()
    assert tuner.resample(1) is True and tuner.current_selection() != first
    summary = tuner.budget_summary()
    assert 0 < summary["used_elements"] <= summary["budget_elements"]


def check_selection(name: str) -> None:
    """The contract of a TraDy selection: calibrated and drawn on a tiny BERT, each draw within the budget and the
    capacity, the same draw for the same (seed, index) on another model (as on every DDP rank)."""
    strategy = SELECTIONS.get(name)
    assert strategy.description
    one, two = find_trady_model(trady_bert(selection=name)), find_trady_model(trady_bert(selection=name))
    for index in (1, 2):
        one.resample(index)
        two.resample(index)
        summary = one.budget_summary()
        assert 0 < summary["used_elements"] <= summary["budget_elements"] and summary["channels"] > 0
        assert one.current_selection() == two.current_selection()


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_every_registered_selection_honours_the_contract(name):
    check_selection(name)


def test_a_new_selection_is_one_class_and_one_registration():
    from toy_extensions import FirstChannels, registered_toys

    with registered_toys():
        check_selection(FirstChannels.name)
        model = trady_bert(selection=FirstChannels.name)
        tuner = find_trady_model(model)
        assert all(channels == list(range(len(channels))) for channels in tuner.current_selection().values())
        assert model.peft_config["default"].selected_layers is None  # it asked for no layer ranking
    with pytest.raises(ValueError, match=f"unknown selection '{FirstChannels.name}'"):
        TraDyConfig(selection=FirstChannels.name)


def test_resample_every_steps_runs_from_an_optimizer_hook():
    model = trady_bert(resample_every_steps=2, selection="rgn_weighted")  # a selection that re-draws
    tuner = find_trady_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    selections = [tuner.current_selection()]
    for step in range(4):
        optimizer.zero_grad()
        model(**bert_batch(seed=step)).loss.backward()
        optimizer.step()
        selections.append(tuner.current_selection())
    assert selections[1] == selections[0] and selections[2] != selections[1]
    assert selections[3] == selections[2] and selections[4] != selections[3]
    assert [i for i, _ in tuner.selection_history()] == [0, 1, 2]


def test_default_targets_skip_head_and_tied_output_embeddings():
    from hf_collapse.trady.model import default_target_modules

    gpt2 = tiny_models.gpt2()
    names = default_target_modules(gpt2)
    assert "lm_head" not in names and "transformer.h.0.attn.c_attn" in names
    roberta = tiny_models.roberta()
    names = default_target_modules(roberta, ["classifier"])
    assert not any(n.startswith("classifier") for n in names) and "roberta.encoder.layer.0.output.dense" in names


# ----------------------------------------------------------------------------------------------- real savings


def test_saved_bytes_fall_with_the_budget_as_the_cost_model_predicts():
    batch = bert_batch(batch=4, seq=9)
    reports, predicted = [], []
    for ratio in (0.05, 0.1, 0.2, 0.4):
        model = trady_bert(budget_ratio=ratio, selection="full_random")
        tuner = find_trady_model(model)
        report = memory_report(model, batch)
        # x_sel (float32, batch x positions x k) + the index of each layer (int64)
        expected = sum(
            4 * 4 * {c.name: c for c in tuner.sampler().costs}[name].positions * len(ch) + 8 * len(ch)
            for name, ch in tuner.current_selection().items()
        )
        assert report.saved_bytes_weight_derivative == expected
        reports.append(report)
        predicted.append(tuner.budget_summary()["used_activation_elements_per_sample"])
    assert all(a.saved_bytes_weight_derivative < b.saved_bytes_weight_derivative for a, b in zip(reports, reports[1:]))
    assert all(a.target_trainable_elements < b.target_trainable_elements for a, b in zip(reports, reports[1:]))
    assert all(a < b for a, b in zip(predicted, predicted[1:]))
    # the activation sparsity follows the budget: about 1 - ratio
    assert reports[0].activation_sparsity > 0.9 and 0.5 < reports[-1].activation_sparsity < 0.7


def test_full_finetuning_reference_and_what_trady_cannot_save():
    batch = bert_batch(batch=4, seq=9)
    torch.manual_seed(0)
    base = tiny_models.bert().train()
    targets = ["query", "key", "value", "dense"]
    full = memory_report(base, batch, target_modules=targets)
    sparse = memory_report(trady_bert(budget_ratio=0.05), batch)
    assert full.method == "full" and sparse.method == "trady"
    assert sparse.saved_bytes_weight_derivative <= 0.1 * full.saved_bytes_weight_derivative
    assert sparse.saved_bytes_total < full.saved_bytes_total
    # propagation (softmax, norms, activation inputs) is most of what full fine-tuning saves: TraDy keeps it
    assert full.saved_bytes_propagation > 0.4 * full.saved_bytes_total
    assert sparse.saved_bytes_propagation > 0.5 * sparse.saved_bytes_total
    assert sparse.weight_derivative_flops < 0.1 * full.weight_derivative_flops
    assert sparse.backward_flops < full.backward_flops
    assert 0.9 < sparse.weight_derivative_sparsity < 1.0 and 0.9 < sparse.weight_derivative_flops_reduction < 1.0


def test_max_depth_stops_backpropagation_near_the_top():
    batch = bert_batch(batch=4, seq=9)
    everywhere = trady_bert(budget_ratio=0.05, selection="full_random")
    top = trady_bert(budget_ratio=0.05, selection="full_random", max_depth=3)
    tuner = find_trady_model(top)
    layers = list(tuner.trady_layers())
    assert set(tuner.current_selection()) <= set(layers[-3:])
    deep, shallow = memory_report(everywhere, batch), memory_report(top, batch)
    assert shallow.saved_bytes_propagation < 0.5 * deep.saved_bytes_propagation
    assert (
        shallow.lowest_trained_layer.endswith(layers[-3])
        or shallow.lowest_trained_layer.split("base_model.model.")[-1] in layers[-3:]
    )


# ----------------------------------------------------------------------------------------------- save / reload


def test_save_reload_and_merge_and_unload_are_exact(tmp_path):
    model = trady_bert(budget_ratio=0.1, selection="rgn_weighted")  # re-draws: merged updates to save
    tuner = find_trady_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for epoch in range(3):  # updates merged at two re-samplings, plus a live delta
        tuner.resample(epoch, optimizer)
        optimizer.zero_grad()
        model(**bert_batch(seed=epoch)).loss.backward()
        optimizer.step()
    assert any(layer.trady_merged["default"].any() for layer in tuner.trady_layers().values())
    assert torch.count_nonzero(tuner.trady_flat["default"]) > 0
    model.eval()
    batch = bert_batch(seed=7)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TRADY" and saved["selected_layers"] and saved["layer_positions"]
    assert (tmp_path / "adapter_model.safetensors").is_file()

    torch.manual_seed(0)
    fresh = tiny_models.bert().eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(find_trady_model(reloaded), trady.TraDyModel)
    with torch.no_grad():
        again = reloaded(**batch).logits
    assert torch.equal(again, expected)
    assert find_trady_model(reloaded).current_selection() == tuner.current_selection()

    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not any(isinstance(m, TraDyLayer) for m in merged.modules())
    with torch.no_grad():
        plain = merged(**batch).logits
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-6)
    merged.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        plain_again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")(**batch).logits
    torch.testing.assert_close(plain_again, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "settings,error,message",
    [
        (dict(selection="best"), ValueError, "unknown selection 'best'; accepted: trady, static_topk_random"),
        (
            dict(budget_elements=10, budget_ratio=0.1),
            ValueError,
            "give one budget.*not budget_elements and budget_ratio",
        ),
        (dict(budget_bytes=40, budget_ratio=0.1), ValueError, "not budget_bytes and budget_ratio"),
        (dict(budget_bytes=40, budget_elements=10), ValueError, "not budget_elements and budget_bytes"),
        (dict(budget_bytes=0), ValueError, "budget_bytes must be a positive number of bytes"),
        (dict(budget_ratio=1.5), ValueError, r"budget_ratio must be in \(0, 1\]"),
        (dict(budget_elements=0), ValueError, "budget_elements must be a positive"),
        (dict(coverage=0), ValueError, "coverage"),
        (dict(max_depth=0), ValueError, "max_depth"),
        (dict(bias="all"), ValueError, "bias must be 'none'"),
    ],
)
def test_bad_config_values_are_refused(settings, error, message):
    with pytest.raises(error, match=message):
        TraDyConfig(**settings)


def test_budget_too_small_for_one_channel_is_refused():
    torch.manual_seed(0)
    model = get_peft_model(tiny_models.bert(), TraDyConfig(task_type="SEQ_CLS", budget_elements=5))
    with pytest.raises(ValueError, match="cannot hold a single channel.*costs 3[0-9] elements"):
        calibrate(model, [bert_batch()])


def test_unmatched_or_unsupported_targets_are_refused():
    with pytest.raises(ValueError, match="no module matches target_modules.*e.g."):
        get_peft_model(tiny_models.bert(), TraDyConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="cannot target .*word_embeddings.*Embedding"):
        get_peft_model(tiny_models.bert(), TraDyConfig(target_modules=["word_embeddings"]))


def test_a_calibration_that_misses_a_layer_is_refused_naming_it():
    """A config whose ``layer_positions`` (the calibration's measurements) lack a TraDy layer cannot size the channel
    slices: refused when the adapter is built, saying to calibrate."""
    calibrated = find_trady_model(trady_bert()).peft_config["default"]
    positions = dict(calibrated.layer_positions)
    dropped = next(iter(positions))
    del positions[dropped]
    config = TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, layer_positions=positions, selection="full_random")
    with pytest.raises(ValueError, match=r"layer_positions lacks 1 TraDy layer\(s\) \(\['" + re.escape(dropped)):
        get_peft_model(tiny_models.bert(), config)


def test_raw_training_forward_on_an_uncalibrated_adapter_says_to_calibrate():
    model = get_peft_model(tiny_models.bert(), TraDyConfig(task_type="SEQ_CLS"))
    model.eval()
    with torch.no_grad():
        model(**bert_batch())  # inference needs no calibration
    model.train()
    with pytest.raises(RuntimeError, match=r"not calibrated: call hf_collapse\.trady\.calibrate\(model, batches\)"):
        model(**bert_batch()).loss.backward()


def test_unknown_selected_layers_are_refused():
    model = get_peft_model(tiny_models.bert(), TraDyConfig(task_type="SEQ_CLS", selected_layers=["bert.nowhere"]))
    with pytest.raises(ValueError, match="not TraDy layers of this model.*bert.nowhere"):
        calibrate(model, [bert_batch()])


# ----------------------------------------------------------------------------------------------- Trainer


class SelectionRecorder(TrainerCallback):
    def __init__(self):
        self.selections = []

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self.selections.append(find_trady_model(model).current_selection())


def test_trainer_resamples_at_every_epoch(tmp_path):
    model = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, selection="full_random"))
    collator = PadOnlyCollator()
    data = toy_dataset(16)
    calibrate(model, [collator([data[i] for i in range(4)])])
    recorder = SelectionRecorder()
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=0.1,
        optim="sgd",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[TraDyCallback(), recorder]
    )
    trainer.train()
    first, second, third = recorder.selections
    assert first != second and second != third
    tuner = find_trady_model(model)
    assert [i for i, _ in tuner.selection_history()] == [0, 1, 2]
    # reproducible: the same seed draws the same channels
    assert (
        first
        == find_trady_model(
            get_peft_model(tiny_bert(), copy.deepcopy(model.peft_config["default"]))
        ).current_selection()
    )


# ----------------------------------------------------------------------------------------------- families


FAMILIES = ["mobilenet_v2", "resnet_bottleneck", "swin", "vit", "bert", "roberta", "gpt2", "llama"]


def _family_batch(name):
    case = tiny_models.CASES_BY_NAME[name]
    batch = case.inputs()
    if "input_ids" in batch:
        batch["labels"] = batch["input_ids"].clone() if name in ("gpt2", "llama") else torch.tensor([0, 2])
    else:
        batch["labels"] = torch.tensor([0, 2])
    return batch


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_only_selected_channels_and_merges_exactly(name):
    case = tiny_models.CASES_BY_NAME[name]
    torch.manual_seed(0)
    base = case.build().train()
    kinds = {
        type(channel_ops_for(m)).__name__
        for m in base.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D))
        and (not isinstance(m, nn.Conv2d) or m.groups in (1, m.in_channels))
    }
    head = ["classifier"] if hasattr(base, "classifier") else None  # ResNet's is a Sequential, RoBERTa's a module
    model = get_peft_model(base, TraDyConfig(budget_ratio=0.2, modules_to_save=head, selection="full_random"))
    batch = _family_batch(name)
    calibrate(model, [batch])
    tuner = find_trady_model(model)
    layer_kinds = {layer.ops.kind for layer in tuner.trady_layers().values()}
    if name == "mobilenet_v2":
        assert {"conv2d", "depthwise"} <= layer_kinds
    if name == "gpt2":
        assert layer_kinds == {"conv1d"}
    selection = tuner.current_selection()
    assert selection and kinds
    before = effective_weights(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    after = effective_weights(model)
    for layer_name, weight in before.items():
        layer = tuner.trady_layers()[layer_name]
        diff = layer.ops.channel_norms(after[layer_name] - weight)
        assert set(diff.nonzero().flatten().tolist()) <= set(selection.get(layer_name, [])), layer_name
    assert any((after[n] != before[n]).any() for n in selection)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = tiny_models.output_of(model, inputs)
        merged = model.merge_and_unload()
        torch.testing.assert_close(tiny_models.output_of(merged, inputs), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- more behaviour


def test_bf16_autocast_step_trains_the_slices():
    model = trady_bert()
    tuner = find_trady_model(model)
    flat = tuner.trady_flat["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**bert_batch()).loss
    loss.backward()
    assert flat.grad is not None and flat.grad.dtype == torch.float32 and torch.isfinite(flat.grad).all()
    assert flat.grad.abs().sum() > 0


@pytest.mark.parametrize("selection", ["trady", "rgn_weighted"])
def test_selected_layers_are_reused_across_tasks_without_a_new_ranking(selection):
    """Layers ranked once are reused on a new task: a uniform draw needs no gradients at all; an RGN-weighted one
    measures its channels' RGN (and with it the layers'), but keeps the given layers."""
    first = trady_bert(budget_ratio=0.05, selection=selection)
    kept = first.peft_config["default"].selected_layers
    torch.manual_seed(1)
    config = TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05, selected_layers=list(kept), selection=selection)
    second = get_peft_model(tiny_models.bert(), config)
    summary = calibrate(second, [bert_batch(seed=9)])
    if selection == "trady":
        assert second.peft_config["default"].layer_rgn is None  # no gradient ranking was computed
    assert summary["selected_layers"] == kept and set(find_trady_model(second).current_selection()) <= set(kept)


def test_det_rgn_refresh_keeps_the_flat_parameter():
    model = trady_bert(selection="det_rgn")
    tuner = find_trady_model(model)
    flat = tuner.trady_flat["default"]
    layer = next(iter(tuner.trady_layers().values()))
    before = layer.trady_rgn["default"].clone()
    tuner.refresh_rgn([bert_batch(seed=11), bert_batch(seed=12)])
    assert tuner.trady_flat["default"] is flat
    assert not torch.equal(before, layer.trady_rgn["default"])


# ----------------------------------------------------------------------------------------------- examples


def _run_example(script, output_dir, *args):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable,
        os.path.join(root, "examples", script),
        "--output_dir",
        str(output_dir),
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
        "--calibration_batches",
        "1",
        "--max_steps",
        "2",
        *args,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((output_dir / "trady_report.json").read_text())
    assert json.loads((output_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "TRADY"
    assert (output_dir / "merged" / "config.json").is_file()
    assert report["memory"]["saved_bytes_weight_derivative"] < report["memory"]["saved_bytes_total"]
    assert report["selection_history"][0][0] == 0
    return report, result.stdout


@pytest.mark.slow
def test_text_example_runs_end_to_end(tmp_path):
    report, out = _run_example(
        "trady_text_classification.py",
        tmp_path,
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "5e-4",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "32",
    )
    assert "weight-derivative part (bytes)" in out and "accuracy:" in out
    assert 0.9 < report["memory"]["weight_derivative_sparsity"] < 1.0


@pytest.mark.slow
def test_image_example_runs_end_to_end(tmp_path):
    report, out = _run_example(
        "trady_image_classification.py",
        tmp_path,
        "--arch",
        "mobilenet_v2",
        "--pretrain_epochs",
        "0.05",
        "--per_device_train_batch_size",
        "16",
        "--image_size",
        "8",
    )
    assert "TraDy (mobilenet_v2)" in out and report["calibration"]["selected_layers"]


# ----------------------------------------------------------------------------------------------- the peft way


class FlatGradients(TrainerCallback):
    """Records, before every optimizer step, the size and the norm of the flat parameter's gradient."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grad = find_trady_model(model).trady_flat["default"].grad
        self.norms.append((0, 0.0) if grad is None else (grad.numel(), float(grad.norm())))


def _toy_trainer(tmp_path, model, callbacks=(), **settings):
    options = dict(
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=0.1,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    options.update(settings)
    return Trainer(
        model=model,
        args=TrainingArguments(str(tmp_path), **options),
        train_dataset=toy_dataset(16),
        data_collator=PadOnlyCollator(),
        callbacks=list(callbacks),
    )


def _toy_calibration_batches(n=4, batch_size=4):
    data, collator = toy_dataset(16), PadOnlyCollator()
    return [collator([data[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(n)]


def test_the_callback_calibrates_the_adapter_and_trains_its_channels(tmp_path):
    """get_peft_model, then a Trainer with callbacks=[TraDyCallback()] and no calibrate: the callback calibrates the
    adapter on the first training batches when training begins, re-samples at the epoch boundary, and the TraDy
    channels train (not only the head), exactly as after an explicit calibrate on the same batches. The Trainer is
    never looked for: transformers' callbacks hand TraDy the model and the optimizer."""
    model = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, selection="full_random"))
    tuner = find_trady_model(model)
    assert not tuner.is_calibrated() and tuner.trady_flat["default"].numel() == 0
    original = {n: layer.get_base_layer().weight.detach().clone() for n, layer in tuner.trady_layers().items()}
    gradients = FlatGradients()
    trainer = _toy_trainer(tmp_path, model, [TraDyCallback(), gradients])
    trainer.train()
    assert tuner.is_calibrated() and model.peft_config["default"].layer_positions
    assert sum(isinstance(c, TraDyCallback) for c in trainer.callback_handler.callbacks) == 1
    capacity = tuner.trady_flat["default"].numel()
    assert capacity > 0 and len(gradients.norms) == 8
    assert all(size == capacity and norm > 0 for size, norm in gradients.norms)  # the flat parameter got gradients
    assert [i for i, _ in tuner.selection_history()] == [0, 1]  # re-sampled at the epoch boundary
    changed = [
        n for n, layer in tuner.trady_layers().items() if not torch.equal(layer.get_base_layer().weight, original[n])
    ]
    assert changed and all(tuner.trady_layers()[n].trady_merged["default"].any() for n in changed)
    assert torch.count_nonzero(tuner.trady_flat["default"]) > 0

    explicit = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, selection="full_random"))
    calibrate(explicit, _toy_calibration_batches())
    _toy_trainer(tmp_path / "explicit", explicit, [TraDyCallback()]).train()
    reference = dict(explicit.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, reference[name], rtol=0, atol=1e-6, msg=name)


def test_a_trainer_without_the_callback(tmp_path, caplog):
    """Without TraDyCallback nothing calibrates the adapter at the start of training: refused at the first training
    forward, naming the two ways. A calibrated adapter trains its first draw, with a warning that nothing re-samples."""
    fresh = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
    with pytest.raises(RuntimeError, match=r"not calibrated.*calibrate\(model, batches\).*TraDyCallback"):
        _toy_trainer(tmp_path / "fresh", fresh).train()
    calibrated = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
    calibrate(calibrated, _toy_calibration_batches())
    with caplog.at_level("WARNING", logger="hf_collapse.trady.sampling"):
        _toy_trainer(tmp_path / "calibrated", calibrated).train()
    assert "nothing re-samples the channels" in caplog.text and "TraDyCallback" in caplog.text
    assert [i for i, _ in find_trady_model(calibrated).selection_history()] == [0]


def test_disable_adapter_and_unload_give_back_the_original_or_refuse():
    torch.manual_seed(0)
    original = tiny_models.bert().eval()
    expected_state = {k: v.clone() for k, v in original.state_dict().items()}
    batch = bert_batch(seed=3)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = original(**inputs).logits
    config = TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, selection="rgn_weighted")  # re-draws
    model = get_peft_model(copy.deepcopy(original).train(), config)
    calibrate(model, [bert_batch(seed=s) for s in range(2)])
    tuner = find_trady_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**bert_batch()).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, expected)  # the adapter (and the head) changed the output
        model.merge_adapter()  # a peft merge of the current delta is undone exactly
        with model.disable_adapter():
            assert torch.equal(
                model.base_model.model.bert(**inputs).last_hidden_state, original.bert(**inputs).last_hidden_state
            )
    unloaded = copy.deepcopy(model).unload()
    for key, value in unloaded.state_dict().items():
        if not key.startswith("classifier"):  # the head is a modules_to_save copy: its original is kept
            assert torch.equal(value, expected_state[key]), key

    tuner.resample(1, optimizer)  # merges the update into the base weights
    assert tuner.merged_channel_count() > 0
    with pytest.raises(RuntimeError, match="earlier re-samplings .* were merged into the base weights"):
        with model.disable_adapter():
            pass
    with pytest.raises(RuntimeError, match="cannot unload .*merged into the base weights.*merge_and_unload"):
        model.unload()
    assert any(isinstance(m, TraDyLayer) for m in model.modules())  # nothing half-done
    assert not any(layer.disable_adapters for layer in tuner.trady_layers().values())


# ----------------------------------------------------------------------------------------------- resume


def _final_parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["epoch", "steps", "steps_auto", "det_rgn"])
def test_resumed_trainer_run_ends_where_the_uninterrupted_one_does(tmp_path, mode):
    """3 epochs of 4 steps, checkpoint at step 6: mid-epoch for epoch re-sampling, mid-interval for
    resample_every_steps=4. steps_auto: the adapter calibrated itself (no calibrate call) in both runs. det_rgn: the
    channels of highest RGN, re-ranked at each epoch start; a run resumed mid-epoch keeps the ranking of that epoch's
    start (saved with the adapter) instead of ranking again on partly trained weights."""
    settings = dict(task_type="SEQ_CLS", budget_ratio=0.1, selection="det_rgn" if mode == "det_rgn" else "full_random")
    if mode in ("steps", "steps_auto"):
        settings["resample_every_steps"] = 4

    def fresh():
        model = get_peft_model(tiny_bert(), TraDyConfig(**settings))
        if mode != "steps_auto":
            calibrate(model, _toy_calibration_batches())
        return model

    options = dict(num_train_epochs=3, save_strategy="steps", save_steps=6)
    full = fresh()
    _toy_trainer(tmp_path, full, [TraDyCallback()], **options).train()
    history = find_trady_model(full).selection_history()
    assert len(history) >= 3  # re-sampled before and after the checkpoint
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["TraDyCallback"]
    assert saved["attributes"]["run_state"]["optimizer_steps"] == 6

    resumed = fresh()
    _toy_trainer(tmp_path / "resumed", resumed, [TraDyCallback()], **options).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert find_trady_model(resumed).current_selection() == find_trady_model(full).current_selection()
    expected = _final_parameters(full)
    for name, parameter in _final_parameters(resumed).items():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=1e-5, msg=name)
    base = {n: layer.get_base_layer().weight for n, layer in find_trady_model(full).trady_layers().items()}
    for name, layer in find_trady_model(resumed).trady_layers().items():
        torch.testing.assert_close(layer.get_base_layer().weight, base[name], rtol=0, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------- budgets in bytes


def test_a_budget_in_bytes_is_the_element_budget_times_the_element_size():
    by_elements = trady_bert(budget_ratio=None, budget_elements=3000)
    by_bytes = trady_bert(budget_ratio=None, budget_bytes=4 * 3000)  # float32 weights: 4 bytes per element
    assert by_bytes.peft_config["default"].budget_description == "12000 bytes"
    assert find_trady_model(by_bytes).current_selection() == find_trady_model(by_elements).current_selection()
    summary = find_trady_model(by_bytes).budget_summary()
    assert summary["budget_elements"] == 3000 and summary["budget_bytes"] == 12000
    assert summary["capacity"] == find_trady_model(by_elements).budget_summary()["capacity"]
    assert 0 < summary["used_bytes"] <= summary["budget_bytes"]
    assert summary["used_bytes"] == 4 * summary["used_elements"]
    torch.manual_seed(0)
    half = get_peft_model(tiny_models.bert().to(torch.bfloat16), TraDyConfig(task_type="SEQ_CLS", budget_bytes=6000))
    calibrate(half, [bert_batch()])
    assert find_trady_model(half).budget_summary()["budget_elements"] == 3000  # bfloat16: 2 bytes per element
    with pytest.raises(ValueError, match="12 bytes.*cannot hold a single channel"):
        trady_bert(budget_ratio=None, budget_bytes=12)


# ----------------------------------------------------------------------------------------------- peak step memory


def test_step_memory_of_a_linear_matches_the_hand_computation():
    """Linear(256 -> 1024), 2048 rows, loss (y * c).sum(). Forward allocates y and y * c (8 MiB each) while the
    parameter (1 MiB) and, after warm-up, AdamW's two moments (2 MiB) are resident: the peak is the forward's,
    parameters + state + 16 MiB. Backward leaves a 1 MiB gradient; with the input frozen nothing else is kept."""
    mib = 2**20
    torch.manual_seed(0)
    linear = nn.Linear(256, 1024, bias=False)
    x, c = torch.randn(2048, 256), torch.randn(2048, 1024)
    weight = linear.weight.detach().clone()

    def loss_fn(outputs, batch):
        return (outputs * c).sum()

    sgd = memory.step_memory(
        linear, {"input": x}, loss_fn=loss_fn, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    assert (sgd.parameter_bytes, sgd.gradient_bytes, sgd.optimizer_state_bytes) == (mib, mib, 0)
    assert sgd.peak_phase == "forward" and sgd.peak_bytes == pytest.approx(17 * mib, abs=64)
    assert sgd.activation_bytes == pytest.approx(16 * mib, abs=64)
    assert sgd.saved_for_backward_bytes == 10 * mib  # autograd keeps x (for the weight gradient) and c
    assert torch.equal(linear.weight, weight) is False  # lr 0.1 did move the weight (the factory's choice)
    linear.weight.data.copy_(weight)
    adamw = memory.step_memory(linear, {"input": x}, loss_fn=loss_fn)  # AdamW, lr 0: the weights stay
    assert torch.equal(linear.weight, weight) and linear.weight.grad is None
    assert adamw.optimizer_state_bytes == pytest.approx(2 * mib, abs=16)  # exp_avg, exp_avg_sq (+ step)
    assert adamw.peak_bytes == pytest.approx(19 * mib, abs=64) and adamw.optimizer == "AdamW"
    assert set(adamw.phase_peak_bytes) == {"forward", "backward", "optimizer"}
    linear.requires_grad_(False)
    frozen = memory.step_memory(linear, {"input": x}, loss_fn=loss_fn)  # inference: y alone
    assert frozen.method == "frozen" and frozen.peak_bytes == pytest.approx(9 * mib, abs=64)
    assert frozen.gradient_bytes == frozen.optimizer_state_bytes == 0


def test_peak_memory_bytes_is_the_most_a_step_held_at_once():
    """Two 1 MiB tensors alive together, then one freed and a third allocated: the peak is 2 MiB, not 3."""
    mib = 2**20

    def step():
        a, b = torch.empty(mib // 4), torch.empty(mib // 4)
        del a
        c = torch.empty(mib // 4)
        return b, c

    assert memory.peak_memory_bytes(step) == pytest.approx(2 * mib, abs=64)


def test_step_memory_leaves_a_trady_run_where_it_was():
    model = trady_bert(resample_every_steps=1)
    tuner = find_trady_model(model)
    before = (
        copy.deepcopy(tuner.current_selection()),
        tuner.sampler().steps,
        tuner.trady_flat["default"].detach().clone(),
        effective_weights(model),
    )
    report = memory.step_memory(model, bert_batch(), warmup_steps=2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the flat parameter and the head
    assert report.method == "trady" and report.gradient_bytes == 4 * trainable
    assert tuner.current_selection() == before[0] and tuner.sampler().steps == before[1]
    assert torch.equal(tuner.trady_flat["default"], before[2]) and tuner.trady_flat["default"].grad is None
    for name, weight in effective_weights(model).items():
        assert torch.equal(weight, before[3][name])
    assert model.peft_config["default"].resample_every_steps == 1
    assert "| peak of a training step |" in report.to_markdown()


# ----------------------------------------------------------------------------------------------- sharding refusals


@pytest.fixture
def one_process_group(tmp_path):
    """A real 1-process gloo group on CPU, destroyed afterwards (fully_shard needs a process group)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fully_shard(peft_model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,))
    for layer in peft_model.base_model.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(peft_model, mesh=mesh)
    assert any(isinstance(p, DTensor) for p in peft_model.parameters())


def test_fully_sharded_parameters_are_refused_at_calibration_and_training(one_process_group):
    fresh = get_peft_model(tiny_models.bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
    _fully_shard(fresh)
    with pytest.raises(
        trady.ShardedTrainingError,
        match=r"TraDy cannot calibrate under FSDP2 \(fully_shard"
        r".*Supported: a single device .* and DDP",
    ):
        calibrate(fresh, [bert_batch()])
    calibrated = trady_bert()  # calibrated on one device, then sharded
    _fully_shard(calibrated)
    with pytest.raises(trady.ShardedTrainingError, match="TraDy cannot train under FSDP2"):
        calibrated(**bert_batch()).loss.backward()
    with pytest.raises(trady.ShardedTrainingError, match="cannot re-sample .* under FSDP2"):
        find_trady_model(calibrated).resample(1)


def test_zero3_partitioned_parameters_are_refused():
    # DeepSpeed is not installed here: a ZeRO-3 parameter is recognised by the `ds_id` attribute DeepSpeed gives it.
    model = trady_bert()
    find_trady_model(model).model.bert.encoder.layer[0].attention.self.query.base_layer.weight.ds_id = 3
    with pytest.raises(trady.ShardedTrainingError, match="DeepSpeed ZeRO-3 partitioned parameters"):
        calibrate(model, [bert_batch()])


def test_trainer_under_fsdp_or_deepspeed_is_refused_at_start(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    def set_mode(kind):  # as accelerate does: AcceleratorState() copies PartialState's shared state when created
        monkeypatch.setattr(PartialState(), "distributed_type", kind)
        monkeypatch.setattr(AcceleratorState(), "distributed_type", kind)

    # accelerate reports FSDP / DeepSpeed only on accelerators, and Trainer.train() then prepares the model for them
    # (which needs one) before any callback runs. So the mode is set on accelerate's real process-wide state, with its
    # real enum, beside a real Trainer, and TraDy's start under a Trainer is driven as train() drives it: the
    # Trainer's own callback handler's on_train_begin (for a calibrated adapter, and for one the callback calibrates).
    calibrated = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
    calibrate(calibrated, _toy_calibration_batches())
    trainer = _toy_trainer(tmp_path / "callback", calibrated, [TraDyCallback()], max_steps=1)
    fresh = get_peft_model(tiny_bert(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
    auto_trainer = _toy_trainer(tmp_path / "auto", fresh, [TraDyCallback()], max_steps=1)  # (resets accelerate)
    assert AcceleratorState().initialized
    set_mode(DistributedType.FSDP)
    with pytest.raises(
        trady.ShardedTrainingError,
        match="TraDy cannot train under FSDP .accelerate's "
        r"distributed_type is FSDP.*Supported: .*DDP",
    ):
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    with pytest.raises(trady.ShardedTrainingError, match="distributed_type is FSDP"):
        auto_trainer.callback_handler.on_train_begin(auto_trainer.args, auto_trainer.state, auto_trainer.control)
    assert not find_trady_model(fresh).is_calibrated()  # refused before calibrating
    set_mode(DistributedType.DEEPSPEED)
    with pytest.raises(trady.ShardedTrainingError, match="TraDy cannot calibrate under DeepSpeed"):
        calibrate(fresh, _toy_calibration_batches())
    set_mode(DistributedType.NO)  # one device: supported (DDP under torchrun: tests/test_trady_distributed.py)
    trainer.train()
    assert trainer.state.global_step == 1

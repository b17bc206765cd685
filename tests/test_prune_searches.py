"""hf_collapse.prune: the field's depth-pruning searches in one API, each checked against a brute-force
re-implementation written here from the papers' definitions (plain deep copies and hooks on the model's own
layers, none of the library's scoring or replay code)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import CASES_BY_NAME

import hf_collapse
from hf_collapse.metrics import perplexity


def _batches(padded: bool = False):
    g = torch.Generator().manual_seed(0)
    batches = []
    for size in (4, 3):  # unequal batch sizes: the losses are weighted by batch size
        ids = torch.randint(3, 99, (size, 12), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if padded:
            mask = torch.ones_like(ids)
            mask[0, :4] = 0  # left padding in the first sequence
            batch["attention_mask"] = mask
            batch["labels"][mask == 0] = -100
        batches.append(batch)
    return batches


def _loss(model, batches) -> float:
    with torch.no_grad():
        total = sum(b["input_ids"].shape[0] * float(model(**b).loss) for b in batches)
    return total / sum(b["input_ids"].shape[0] for b in batches)


def _layers(model):
    return model.model.layers


def _weights(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _greedy_by_loss(model, batches, steps, sublayers: bool, per_flop: bool = False):
    """SLEB / BlockPruner by brute force: at each step try every removal on a deep copy, keep the cheapest (with
    ``per_flop``: the least loss increase per parameter removed, a sub-layer counted with the norm that feeds it)."""
    model = copy.deepcopy(model).eval()
    original = [f"model.layers.{i}" for i in range(len(_layers(model)))]  # original names, in order
    gone: dict[int, set[str]] = {i: set() for i in range(len(original))}  # original index -> sub-layers gone
    chosen = []
    for _ in range(steps):
        alive = [i for i in gone if len(gone[i]) < 2]
        options = []  # (original unit name, current name)
        for position, i in enumerate(alive):
            if not sublayers:
                options.append((original[i], f"model.layers.{position}"))
                continue
            for part in ("self_attn", "mlp"):
                if part in gone[i]:
                    continue
                other = "mlp" if part == "self_attn" else "self_attn"
                if other in gone[i]:  # the layer's last sub-layer: the whole block goes
                    options.append((original[i], f"model.layers.{position}"))
                else:
                    options.append((f"{original[i]}.{part}", f"model.layers.{position}.{part}"))
        if len(alive) == 1:  # never the last block
            options = [o for o in options if o[0] not in original]
        losses = {}
        before = _loss(model, batches)
        for unit, current in options:
            losses[unit] = _loss(hf_collapse.remove_blocks(model, [current]), batches)
            if per_flop:
                module = model.get_submodule(current)
                if current.endswith("self_attn"):
                    module = [module, model.get_submodule(current.replace("self_attn", "input_layernorm"))]
                elif current.endswith("mlp"):
                    module = [module, model.get_submodule(current.replace("mlp", "post_attention_layernorm"))]
                removed = sum(_weights(m) for m in module) if isinstance(module, list) else _weights(module)
                losses[unit] = (losses[unit] - before) / (removed / 1e6)
        unit = min(losses, key=losses.get)
        current = dict(options)[unit]
        model = hf_collapse.remove_blocks(model, [current])
        index = original.index(unit.rsplit(".", 1)[0] if unit not in original else unit)
        gone[index] |= {"self_attn", "mlp"} if unit in original else {unit.rsplit(".", 1)[1]}
        chosen.append(unit)
    return chosen


@pytest.mark.parametrize("method", ["sleb", "blockpruner"])
def test_iterative_searches_remove_what_brute_force_greedy_removes(method):
    model = CASES_BY_NAME["llama"].build()
    batches = _batches()
    steps = 4 if method == "sleb" else 6
    expected = _greedy_by_loss(model, batches, steps, sublayers=method == "blockpruner")
    if method == "blockpruner":  # the search must have emptied a layer by removing its last sub-layer
        assert any(u.count(".") == 2 for u in expected)
    before = copy.deepcopy(model.state_dict())

    pruned, report = hf_collapse.prune(model, batches, method=method, num_units=steps, latency_repeats=0)

    assert [s.unit for s in report.steps[1:]] == expected
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    assert _loss(pruned, batches) == pytest.approx(report.steps[-1].score, rel=1e-5)  # a step's score: its loss
    cost = report.extra["search_cost"]
    assert cost["forward_passes"] > 0 and cost["search_seconds"] >= 0
    # the pruned model reloads exactly (the edits are recorded in original names)
    record = hf_collapse.collapse_record(pruned)
    assert len(record["edits"]) == steps


def test_blockpruner_per_flop_ranks_by_loss_increase_per_parameter_as_brute_force_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # MLPs four times the attention's weights (SmolLM2's ratio is three): the two criteria part ways
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    batches = _batches()
    expected = _greedy_by_loss(model, batches, 6, sublayers=True, per_flop=True)
    assert expected != _greedy_by_loss(model, batches, 6, sublayers=True)  # the criterion changes the choice here

    pruned, report = hf_collapse.prune(
        model, batches, method="blockpruner", per_flop=True, num_units=6, latency_repeats=0, progress=False
    )

    assert [s.unit for s in report.steps[1:]] == expected
    last = report.steps[-1]
    assert _loss(pruned, batches) == pytest.approx(last.details["calibration_loss"], rel=1e-5)
    assert report.extra["search_cost"]["forward_passes"] > 0
    with pytest.raises(ValueError, match="per_flop is an option of method 'blockpruner', not of"):
        hf_collapse.prune(model, batches, method="sleb", per_flop=True, num_units=1)


def _torch_flops(model, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def test_a_flops_budget_stops_blockpruner_at_the_first_state_that_reaches_it():
    model = CASES_BY_NAME["llama"].build()
    batches = _batches()
    inputs = {"input_ids": batches[0]["input_ids"][:1]}
    original = _torch_flops(model, inputs)

    pruned, report = hf_collapse.prune(
        model,
        batches,
        method="blockpruner",
        per_flop=True,
        flops_fraction=0.6,
        example_inputs=inputs,
        latency_repeats=0,
        progress=False,
    )

    assert report.budget == {"flops_fraction": 0.6}
    assert all(s.kept for s in report.steps)  # nothing over a budget: the search stopped on reaching it
    flops = _torch_flops(pruned, inputs)  # counted by torch, not by the library
    assert flops <= 0.6 * original and report.steps[-1].flops == flops and report.steps[0].flops == original
    assert len(report.steps) >= 3 and report.steps[-2].flops > 0.6 * original  # not a step further than needed
    with pytest.raises(ValueError, match="flops_fraction must be between 0 and 1"):
        hf_collapse.prune(model, batches, method="sleb", flops_fraction=1.0)


def test_a_flops_budget_is_refused_when_no_flops_can_be_counted(monkeypatch):
    import hf_collapse.engine.search as search

    counted = search.measure_step
    monkeypatch.setattr(search, "measure_step", lambda *a, **k: {**counted(*a, **k), "flops": 0})
    with pytest.raises(ValueError, match="torch counted none for this transformers.LlamaForCausalLM"):
        hf_collapse.prune(CASES_BY_NAME["llama"].build(), _batches(), method="sleb", flops_fraction=0.5)


def test_sleb_never_removes_the_last_block_and_stops_when_nothing_is_left():
    model = CASES_BY_NAME["llama"].build()
    pruned, report = hf_collapse.prune(
        model,
        _batches(),
        method="sleb",
        max_metric_delta=math.inf,
        eval_fn=lambda m: perplexity(m, _batches()),
        higher_is_better=False,
        latency_repeats=0,
        progress=False,
    )
    assert len(_layers(pruned)) == 1 and report.after.removed == 4


def _angular_spans(model, batches, length):
    """Gromov et al.'s angular distance arccos(cos(x_l, x_{l+n})) / pi between the hidden state entering layer l and
    leaving layer l+n-1 at each sequence's last real token, averaged over sequences, measured with hooks on the
    model's layers (the padding of the test batches is on the left, so the last real token is the last position,
    and a right-padded batch is checked by its own test)."""
    layers = _layers(model)
    sums, count = {}, 0
    for batch in batches:
        entering, leaving = {}, {}
        handles = []
        for i, layer in enumerate(layers):
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i, seen=entering: seen.__setitem__(
                        i, args[0] if args else kwargs["hidden_states"]
                    ),
                    with_kwargs=True,
                )
            )
            handles.append(
                layer.register_forward_hook(
                    lambda m, args, out, i=i, seen=leaving: seen.__setitem__(
                        i, out[0] if isinstance(out, tuple) else out
                    )
                )
            )
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        for h in handles:
            h.remove()
        count += batch["input_ids"].shape[0]
        for start in range(len(layers) - length + 1):
            x, y = entering[start][:, -1], leaving[start + length - 1][:, -1]
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1, 1)
            sums[start] = sums.get(start, 0.0) + float(torch.arccos(cos).sum() / math.pi)
    return {start: total / count for start, total in sums.items()}


@pytest.mark.parametrize("padded", [False, True])
def test_span_removes_the_span_closest_by_angular_distance(padded):
    model = CASES_BY_NAME["llama"].build()
    batches = _batches(padded)
    distances = _angular_spans(model, batches, 2)
    start = min(distances, key=distances.get)

    pruned, report = hf_collapse.prune(model, batches, method="span", num_units=2, latency_repeats=0, progress=False)

    assert report.steps[1].unit == f"model.layers.{start}, model.layers.{start + 1}"
    assert report.after.removed == 2 and len(report.steps) == 2  # one step: the span goes at once
    listed = {int(k.split(" .. ")[0].rsplit(".", 1)[1]): v for k, v in report.scores.items()}
    assert listed == pytest.approx(distances, rel=1e-6)
    reference = hf_collapse.remove_blocks(model, [f"model.layers.{start}", f"model.layers.{start + 1}"])
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, reference(**inputs).logits)


def test_span_compares_the_last_real_token_of_right_padded_sequences():
    model = CASES_BY_NAME["llama"].build()
    left = _batches(padded=True)
    right = []
    for batch in left:  # the same sequences, their padding moved to the right
        mask = batch["attention_mask"]
        order = torch.argsort(1 - mask, dim=1, stable=True)
        right.append({k: torch.gather(v, 1, order) for k, v in batch.items()})
    scores = {}
    for name, batches in (("left", left), ("right", right)):
        _, report = hf_collapse.prune(model, batches, method="span", num_units=2, latency_repeats=0, progress=False)
        scores[name] = report.scores
    assert scores["right"] == pytest.approx(scores["left"], rel=1e-4)


def test_prune_refusals():
    model = CASES_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="unknown pruning method 'slab'"):
        hf_collapse.prune(model, _batches(), method="slab", num_units=1)
    with pytest.raises(ValueError, match="method 'span' removes num_units consecutive blocks at once"):
        hf_collapse.prune(model, _batches(), method="span", max_metric_delta=1.0, eval_fn=lambda m: 0.0)
    with pytest.raises(ValueError, match="chooses its own units"):
        hf_collapse.prune(model, _batches(), method="sleb", granularity="mlp", num_units=1)
    with pytest.raises(ValueError, match="needs eval_fn"):
        hf_collapse.prune(model, _batches(), method="sleb", max_metric_delta=1.0)
    with pytest.raises(ValueError, match="no stage of this model has 9 consecutive removable blocks"):
        hf_collapse.prune(model, _batches(), method="span", num_units=9)


def test_one_shot_scorers_go_through_the_same_api():
    model = CASES_BY_NAME["llama"].build()
    scores = hf_collapse.score_blocks(model, _batches(), method="block_influence", progress=False)
    expected = sorted(scores, key=scores.get)[:2]
    _, report = hf_collapse.prune(model, _batches(), method="block_influence", num_units=2, latency_repeats=0)
    assert [s.unit for s in report.steps[1:]] == expected
    assert report.extra["search_cost"]["forward_passes"] == len(_batches())


@pytest.mark.parametrize(
    "method,settings",
    [("sleb", dict(num_units=3)), ("blockpruner", dict(per_flop=True, flops_fraction=0.6))],  # a FLOPs budget too
)
def test_an_interrupted_search_resumes_where_it_stopped(method, settings, tmp_path):
    model = CASES_BY_NAME["llama"].build()
    batches = _batches()
    full, full_report = hf_collapse.prune(model, batches, method=method, latency_repeats=0, **settings)

    class Crash(RuntimeError):
        pass

    calls = []

    def crash_on_third(m):
        calls.append(1)
        if len(calls) == 3:
            raise Crash("simulated crash")
        return perplexity(m, batches)

    folder = tmp_path / "progress"
    with pytest.raises(Crash):
        hf_collapse.prune(
            model,
            batches,
            method=method,
            **settings,
            eval_fn=crash_on_third,
            higher_is_better=False,
            latency_repeats=0,
            progress_dir=folder,
        )
    state = json.loads((folder / "progress.json").read_text())
    assert state["status"] == "running" and state["step"] == 1  # the last finished step
    resumed, report = hf_collapse.prune(
        model,
        batches,
        method=method,
        **settings,
        eval_fn=lambda m: perplexity(m, batches),
        higher_is_better=False,
        latency_repeats=0,
        resume_from=folder,
    )
    assert [s.unit for s in report.steps[1:]] == [s.unit for s in full_report.steps[1:]]
    inputs = {"input_ids": batches[0]["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(resumed(**inputs).logits, full(**inputs).logits)

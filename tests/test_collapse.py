"""Block scorers, budgeted collapse and the CollapseReport."""

import contextlib
import copy
import json
import math

import pytest
import torch
from tiny_models import CASES, CASES_BY_NAME, output_of

import hf_collapse
from hf_collapse import metrics
from hf_collapse.report import CollapseReport
from hf_collapse.scoring import SCORERS

msw_scorer, block_influence_scorer, angular_scorer = (
    SCORERS.get(name).statistic for name in ("msw", "block_influence", "angular")
)


def _loader(case, batches=2):
    return [case.inputs() for _ in range(batches)]


def test_scorers_on_known_pairs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g)
    assert block_influence_scorer(x, x, None, g) == pytest.approx(0, abs=1e-6)
    assert angular_scorer(x, x, None, g) == pytest.approx(0, abs=1e-3)
    assert block_influence_scorer(x, -x, None, g) == pytest.approx(2, abs=1e-6)
    assert angular_scorer(x, -x, None, g) == pytest.approx(1, abs=1e-3)
    assert msw_scorer(x, x, None, g) == pytest.approx(0, abs=1e-6)
    assert msw_scorer(x, x + 1, None, g) > 0.5
    # Only real tokens count: the masked token's (opposite) output is ignored.
    y = x.clone()
    y[:, -1] = -x[:, -1]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, -1] = False
    assert block_influence_scorer(x, y, mask, g) == pytest.approx(0, abs=1e-6)
    # Images: cosine over channels at each position.
    image = torch.randn(2, 3, 4, 4, generator=g)
    assert block_influence_scorer(image, 2 * image, None, g) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("method", ["msw", "block_influence", "angular", "random"])
def test_score_blocks_every_method(method):
    case = CASES_BY_NAME["bert"]
    model = case.build()
    scores = hf_collapse.score_blocks(model, _loader(case), method=method, progress=False)
    assert list(scores) == [f"bert.encoder.layer.{i}" for i in range(5)]  # paths in the model passed
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())
    assert scores == hf_collapse.score_blocks(model, _loader(case), method=method, progress=False)


def test_a_block_made_identity_scores_zero():
    case = CASES_BY_NAME["llama"]
    model = case.build()
    layer = model.model.layers[2]
    layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
    # arccos is steep at 1: float32 cosines of 1 - 1e-7 give angles of about 1e-4.
    for method, tolerance in (("msw", 1e-5), ("block_influence", 1e-5), ("angular", 1e-3)):
        scores = hf_collapse.score_blocks(model, _loader(case), method=method, progress=False)
        assert scores["model.layers.2"] == pytest.approx(0, abs=tolerance), method
        assert min(scores, key=scores.get) == "model.layers.2"


def test_score_blocks_on_vision_and_diffusion_models():
    for name in ("resnet_basic", "unet"):
        case = CASES_BY_NAME[name]
        scores = hf_collapse.score_blocks(case.build(), _loader(case, 1), method="msw", progress=False)
        removable = [b.name for b in hf_collapse.find_blocks(case.build()) if b.removable]
        assert list(scores) == removable and all(v > 0 for v in scores.values())


def test_score_blocks_refusals():
    case = CASES_BY_NAME["bert"]
    model = case.build()
    with pytest.raises(ValueError, match="unknown scoring method 'magic'"):
        hf_collapse.score_blocks(model, _loader(case), method="magic")
    with pytest.raises(ValueError, match="pass a dataloader"):
        hf_collapse.score_blocks(model, None, method="msw")
    with pytest.raises(ValueError, match="yielded no batches"):
        hf_collapse.score_blocks(model, [], method="angular", progress=False)


def test_collapse_fixed_number_follows_scores_and_leaves_the_model_alone():
    case = CASES_BY_NAME["gpt2"]
    model = case.build()
    scores = {"h.0": 0.9, "h.1": 0.1, "h.2": 0.5, "h.3": 0.2, "h.4": 0.7}
    collapsed, report = hf_collapse.collapse(model, scores, num_units=3, latency_repeats=1, progress=False)
    assert [r["name"] for r in report.removed] == ["transformer.h.1", "transformer.h.3", "transformer.h.2"]
    assert collapsed.config.n_layer == 2 and model.config.n_layer == 5
    # The survivors are the original blocks 0 and 4, in order.
    expected = hf_collapse.remove_blocks(model, ["h.1", "h.2", "h.3"])
    inputs = case.inputs()
    torch.testing.assert_close(output_of(collapsed, inputs), output_of(expected, inputs), atol=1e-6, rtol=0)
    params = [s.params for s in report.steps]
    assert params == sorted(params, reverse=True) and len(params) == 4
    assert all(s.latency_s > 0 and s.flops > 0 for s in report.steps)


def test_collapse_honours_the_metric_budget_and_rejects_the_step_over_it():
    model = CASES_BY_NAME["bert"].build()
    scores = {f"encoder.layer.{i}": float(i) for i in range(5)}
    evaluated = []

    def eval_fn(m):  # each removed block costs 0.01 accuracy
        evaluated.append(m.config.num_hidden_layers)
        return 0.9 - 0.01 * (5 - m.config.num_hidden_layers)

    collapsed, report = hf_collapse.collapse(
        model, scores, max_metric_delta=0.025, eval_fn=eval_fn, latency_repeats=0, progress=False
    )
    assert collapsed.config.num_hidden_layers == 3
    assert [r["name"] for r in report.removed] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert [s.kept for s in report.steps] == [True, True, True, False]
    assert report.steps[-1].unit == "bert.encoder.layer.2" and report.steps[-1].metric == pytest.approx(0.87)
    assert evaluated == [5, 4, 3, 2]
    assert report.summary()["metric_after"] == pytest.approx(0.88)


def test_collapse_with_a_loss_metric_and_finetune_hook():
    model = CASES_BY_NAME["llama"].build()
    scores = {f"layers.{i}": float(i) for i in range(5)}
    finetuned = []
    collapsed, report = hf_collapse.collapse(
        model,
        scores,
        num_units=4,
        max_metric_delta=0.15,
        higher_is_better=False,
        eval_fn=lambda m: 1.0 + 0.1 * (5 - m.config.num_hidden_layers),
        finetune=lambda m: finetuned.append(m.config.num_hidden_layers),
        latency_repeats=0,
        progress=False,
    )
    assert collapsed.config.num_hidden_layers == 4  # the second removal would raise the loss by 0.2
    assert finetuned == [4, 3]


def test_budget_that_selects_nothing_returns_an_unchanged_copy():
    model = CASES_BY_NAME["bert"].build()
    collapsed, report = hf_collapse.collapse(
        model,
        {"encoder.layer.0": 1.0},
        max_metric_delta=0.0,
        eval_fn=lambda m: float(m.config.num_hidden_layers),
        latency_repeats=0,
        progress=False,
    )
    assert collapsed is not model and collapsed.config.num_hidden_layers == 5
    assert report.removed == [] and report.steps[-1].kept is False


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scores={}), "no scores given"),
        (dict(scores={"encoder.layer.9": 1.0}, num_units=1), "unknown block"),
        (dict(scores={"encoder.layer.0": 1.0}), "no budget"),
        (dict(scores={"encoder.layer.0": 1.0}, max_metric_delta=0.1), "needs eval_fn"),
        (dict(scores={"encoder.layer.0": 1.0}, num_units=0), "num_units must be an integer >= 1"),
        (dict(scores={"encoder.layer.0": 1.0}, num_units=2), "can remove at most 1 of this model's blocks"),
        (dict(scores={"encoder.layer.0": 1.0}, max_metric_delta=-1, eval_fn=float), "must be >= 0"),
        (dict(scores={"encoder.layer.0": 1.0}, flops_fraction=0.0), "flops_fraction must be between 0 and 1"),
    ],
)
def test_collapse_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_collapse.collapse(CASES_BY_NAME["bert"].build(), **kwargs)


def test_collapse_refuses_non_removable_blocks():
    model = CASES_BY_NAME["resnet_basic"].build()
    with pytest.raises(ValueError, match="not removable"):
        hf_collapse.collapse(model, {"encoder.stages.1.layers.0": 0.0}, num_units=1)


def test_report_save_writes_json_markdown_and_plot(tmp_path):
    model = CASES_BY_NAME["bert"].build()
    scores = {f"encoder.layer.{i}": float(i) for i in range(5)}
    _, report = hf_collapse.collapse(
        model,
        scores,
        max_metric_delta=0.025,
        metric_name="accuracy",
        eval_fn=lambda m: 0.9 - 0.01 * (5 - m.config.num_hidden_layers),
        latency_repeats=1,
        progress=False,
    )
    report.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["removed"] == [
        {"name": "bert.encoder.layer.0", "score": 0.0},
        {"name": "bert.encoder.layer.1", "score": 1.0},
    ]
    assert data["summary"]["params_after"] < data["summary"]["params_before"]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("\n| ") == 6 and "no (over budget)" in markdown and "accuracy" in markdown
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CollapseReport.load(tmp_path)
    assert again.to_dict() == report.to_dict()


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.name in ("bert", "swin", "resnet_basic", "mobilenet_v2", "dit", "unet", "llama", "gpt2", "vit")
    ],
    ids=lambda c: c.name,
)
def test_flops_counted_once_equal_a_fresh_count_of_every_state(case):
    """collapse counts FLOPs once and subtracts each removed unit's share: the result is the state's true count."""
    model = case.build()
    inputs = metrics.example_inputs(model, batch_size=1, seq_len=8)
    removable = [b.name for b in hf_collapse.find_blocks(model) if b.removable]
    scores = {name: float(i) for i, name in enumerate(removable)}
    collapsed, report = hf_collapse.collapse(
        model, scores, num_units=min(2, len(removable) - 1), example_inputs=inputs, latency_repeats=0, progress=False
    )
    assert report.before.flops == metrics.forward_flops(model, inputs)
    assert report.after.flops == metrics.forward_flops(collapsed, inputs)
    first = hf_collapse.remove_blocks(model, [report.steps[1].unit])
    assert report.steps[1].flops == metrics.forward_flops(first, inputs)


def test_a_lower_is_better_metric_with_an_increase_or_a_ratio_budget(tmp_path):
    """A perplexity-like metric: collapse stops before the step that breaks max_metric_delta / max_metric_ratio."""
    model = CASES_BY_NAME["llama"].build()
    scores = {b.name: float(i) for i, b in enumerate(hf_collapse.find_blocks(model))}
    perplexities = [10.0, 10.5, 12.0, 14.0, 30.0]

    def run(**budget):
        values = iter(perplexities)
        return hf_collapse.collapse(
            model,
            scores,
            eval_fn=lambda m: next(values),
            higher_is_better=False,
            metric_name="perplexity",
            latency_repeats=0,
            progress=False,
            **budget,
        )[1]

    report = run(max_metric_delta=2.5)
    assert [s.kept for s in report.steps] == [True, True, True, False] and report.after.metric == 12.0
    assert report.budget["max_metric_delta"] == 2.5
    report = run(max_metric_ratio=1.4)  # 14.0 <= 1.4 x 10, 30.0 is not
    assert [s.kept for s in report.steps] == [True, True, True, True, False] and report.after.metric == 14.0
    report.plot(tmp_path / "plot.png")
    assert report._metric_limits() == [(14.0, "budget (x1.4)")]
    with (
        pytest.warns(FutureWarning, match="'max_metric_increase' is deprecated"),
        pytest.raises(ValueError, match="max_metric_increase is the budget of a metric where lower is better"),
    ):
        hf_collapse.collapse(model, scores, eval_fn=float, max_metric_increase=1.0)
    with pytest.raises(ValueError, match="max_metric_ratio must be >= 1"):
        hf_collapse.collapse(model, scores, eval_fn=float, max_metric_ratio=0.5, higher_is_better=False)
    with pytest.raises(ValueError, match=r"max_metric_ratio\) needs eval_fn"):
        hf_collapse.collapse(model, scores, max_metric_ratio=1.5, higher_is_better=False)


@pytest.mark.parametrize(
    "case_name,broken_shortcut,granularity",
    [
        ("llama", False, "block"),
        ("bert", False, "block"),
        ("gpt2", False, "block"),
        ("swin", False, "block"),
        ("llama", True, "block"),
        ("mixtral", False, "block"),
        ("llama", False, "attention"),
        ("gpt2", False, "mlp"),
        ("llama", True, "mlp"),
    ],
)
def test_loss_scores_equal_the_loss_of_each_removal(case_name, broken_shortcut, granularity, caplog, monkeypatch):
    """method='loss' (SLEB): each unit's score is the calibration loss of the model without it, as remove_blocks
    builds it. The prefix-replay shortcut (for sub-layers too: the blocks before the sub-layer's block replayed) is
    checked against a true removal first, on the last unit too (the longest replayed prefix): where it does not hold
    (broken on purpose here; a Mixtral whose replayed layers record no router logits for its auxiliary loss), every
    candidate is measured by removing it in place, never on a copy."""
    from hf_collapse.scoring import loss as scoring

    case = CASES_BY_NAME[case_name]
    model = case.build()
    batch = case.inputs()
    batch["labels"] = batch["input_ids"] if case_name in ("llama", "gpt2", "mixtral") else torch.tensor([0, 1])
    if broken_shortcut:
        monkeypatch.setattr(scoring._Skip, "forward", lambda self, hidden_states=None, *a, **k: hidden_states * 2)
        monkeypatch.setattr(scoring._Replay, "forward", lambda self, *a, **k: _doubled(self.output))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("INFO", logger="hf_collapse.scoring"), copies_of_modules() as copies:
        scores = hf_collapse.score_blocks(model, [batch, batch], method="loss", progress=False, granularity=granularity)
    assert copies == []
    assert ("measuring every candidate by removing it in place" in caplog.text) == (
        broken_shortcut or case_name == "mixtral"
    )
    assert model.state_dict().keys() == before.keys()  # put back: the same structure and weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    removable = [b.name for b in hf_collapse.find_blocks(model, granularity) if b.removable]
    assert list(scores) == removable
    for name in removable:
        with torch.no_grad():
            expected = float(hf_collapse.remove_blocks(model, [name]).eval()(**batch).loss)
        assert scores[name] == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    # the same scores, and the loss of the model as it is (from the replayed full pass, or one more pass without it)
    units = [b for b in hf_collapse.find_blocks(model, granularity) if b.removable]
    again, reference = scoring.loss_scores_and_reference(model, [batch, batch], units, progress=False)
    with torch.no_grad():
        assert reference == pytest.approx(float(model.eval()(**batch).loss), rel=1e-5)
    assert again == pytest.approx(scores, rel=1e-6)
    with pytest.raises(ValueError, match="needs batches with labels"):
        hf_collapse.score_blocks(model, [case.inputs()], method="loss", progress=False)


def _doubled(output):
    return (output[0] * 2, *output[1:]) if isinstance(output, tuple) else output * 2


@contextlib.contextmanager
def copies_of_modules():
    """Records every ``copy.deepcopy`` of a torch module made inside the context (a recording wrapper of the real
    deepcopy): on a real LLM a copy per candidate is an out-of-memory crash."""
    made, real = [], copy.deepcopy

    def recording(value, *args, **kwargs):
        if isinstance(value, torch.nn.Module):
            made.append(type(value).__name__)
        return real(value, *args, **kwargs)

    copy.deepcopy = recording
    try:
        yield made
    finally:
        copy.deepcopy = real


def test_loss_scores_of_sub_layers_remove_them_in_place():
    """Sub-layer units have no replay shortcut: each is removed in place and put back, with no copy of the model."""
    case = CASES_BY_NAME["llama"]
    model = case.build()
    batch = {**case.inputs(), "labels": case.inputs()["input_ids"]}
    with copies_of_modules() as copies:
        scores = hf_collapse.score_blocks(model, [batch], method="loss", granularity="attention", progress=False)
    assert copies == [] and len(scores) == 5
    for name, score in scores.items():
        with torch.no_grad():
            expected = float(hf_collapse.remove_blocks(model, [name]).eval()(**batch).loss)
        assert score == pytest.approx(expected, rel=1e-5), name
    assert all(not isinstance(layer.self_attn, torch.nn.Identity) for layer in model.model.layers)

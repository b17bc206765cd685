"""TLC: statistics against direct computation, exact transforms and fusion, reload, the loop's stop criteria,
site names relative to the model passed (older spellings and records still accepted), batches on the model's device."""

import copy
import json

import pytest
import torch
from tiny_models import CASES_BY_NAME, output_of
from toy_training import PadOnlyCollator, accuracy, tiny_bert, toy_dataset
from transformers import Trainer, TrainingArguments

import hf_collapse
from hf_collapse.architectures.base import adapter_for
from hf_collapse.tlc import TLCConfig, activation_sites, activation_statistics, compress, linearize
from hf_collapse.tlc.compress import calibration_loss
from hf_collapse.tlc.transforms import masked_identity

FAMILIES = ["bert", "vit", "swin", "gpt2", "dit", "transformer2d", "resnet_basic", "resnet_bottleneck", "mobilenet_v2"]


def trained_like(case_name):
    """A tiny model whose BatchNorms carry non-trivial statistics, as after training."""
    model = CASES_BY_NAME[case_name].build()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.bias.shape, generator=g) + 0.5)
    return model


def test_measured_statistics_match_a_direct_computation_without_padding():
    case = CASES_BY_NAME["bert"]
    model = case.build()
    inputs = case.inputs()  # the second sequence has 2 padding tokens
    site = activation_sites(model)[2]
    captured = {}
    handle = model.get_submodule(site.producer).register_forward_hook(
        lambda m, a, out: captured.setdefault("pre", out.detach())
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    real = captured["pre"][inputs["attention_mask"].bool()]
    stats = activation_statistics(model, [inputs], [site])[site.name]
    torch.testing.assert_close(stats.mean, real.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.std, real.std(0, unbiased=False), atol=1e-5, rtol=1e-4)
    assert stats.source == "measured" and stats.neurons_on + stats.neurons_off == real.shape[1]
    # Changing what sits under the padding changes nothing.
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][1, -2:] = 7
    again = activation_statistics(model, [other], [site])[site.name]
    torch.testing.assert_close(again.mean, stats.mean)
    # P(OFF) and entropy follow the Gaussian model.
    z = -stats.mean / stats.std
    torch.testing.assert_close(stats.p_off, torch.distributions.Normal(0, 1).cdf(z), atol=1e-6, rtol=1e-5)
    assert 0 <= stats.entropy <= 1


def test_batchnorm_statistics_need_no_data():
    model = trained_like("resnet_basic")
    site = activation_sites(model)[0]
    stats = activation_statistics(model, [], [site])[site.name]
    norm = model.get_submodule(site.norm)
    assert stats.source == "batchnorm"
    assert torch.equal(stats.mean, norm.bias.detach()) and torch.equal(stats.std, norm.weight.detach().abs())


@pytest.mark.parametrize("case_name", FAMILIES)
def test_transform_is_exact_fusion_is_exact_and_reload_is_exact(case_name, tmp_path):
    case = CASES_BY_NAME[case_name]
    model = trained_like(case_name)
    inputs = case.inputs()
    site = activation_sites(model)[1]
    stats = activation_statistics(model, [inputs], [site])[site.name]
    hook = model.get_submodule(site.activation).register_forward_hook(masked_identity(site, stats.on))
    candidate = output_of(model, inputs)  # the candidate transform, without touching the structure
    hook.remove()
    original = output_of(model, inputs)

    linearized = linearize(model, stats, fuse=False)
    fused = linearize(model, stats, fuse=True)
    assert torch.equal(output_of(model, inputs), original)  # the input model is untouched
    scale = candidate.abs().max()
    assert (output_of(linearized, inputs) - candidate).abs().max() <= 1e-5 * scale
    assert (output_of(fused, inputs) - output_of(linearized, inputs)).abs().max() <= 1e-4 * scale
    record = hf_collapse.collapse_record(fused)
    assert record["edits"][-1]["op"] == "linearize" and record["plain_reload_exact"] is False
    fused.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    torch.testing.assert_close(output_of(reloaded, inputs), output_of(fused, inputs), atol=1e-5, rtol=0)
    assert hf_collapse.collapse_record(reloaded) == record


def test_removing_exactly_off_neurons_changes_nothing():
    """ReLU MLP where every neuron is either always OFF (bias -100) or always ON (bias +100): the transform is
    exact, the OFF neurons are physically gone, and the fused MLP is one d x d map."""
    model = tiny_bert(hidden_act="relu").eval()
    dense = model.bert.encoder.layer[1].intermediate.dense
    with torch.no_grad():
        dense.bias[:16] = -100.0
        dense.bias[16:] = 100.0
    batch = {
        "input_ids": torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    site = activation_sites(model)[1]
    stats = activation_statistics(model, [batch], [site])[site.name]
    assert stats.neurons_off == 16 and stats.neurons_on == 8
    thin = linearize(model, stats, fuse=False)
    layer = thin.bert.encoder.layer[1]
    assert layer.intermediate.dense.out_features == 8 and layer.output.dense.in_features == 8
    assert isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(thin(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    # 8 ON neurons: two thin 16x8 maps (256 MACs) cost what one 16x16 map costs: stay thin; with 12 ON
    # neurons (384 MACs) the single fused map is cheaper.
    assert hf_collapse.collapse_record(linearize(model, stats))["edits"][-1]["form"] == "pair"
    with torch.no_grad():
        dense.bias[12:16] = 100.0
    stats = activation_statistics(model, [batch], [site])[site.name]
    fused = linearize(model, stats)
    assert hf_collapse.collapse_record(fused)["edits"][-1]["form"] == "single"
    assert fused.bert.encoder.layer[1].output.dense.weight.shape == (16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)


def _bert_batch():
    return {
        "input_ids": torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }


def test_site_names_are_relative_to_the_model_passed_and_old_spellings_still_work(tmp_path):
    model = tiny_bert()
    sites = activation_sites(model)
    assert [s.name for s in sites] == [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(3)]
    assert model.get_submodule(sites[1].producer) is model.bert.encoder.layer[1].intermediate.dense
    assert model.get_submodule(sites[1].consumer) is model.bert.encoder.layer[1].output.dense
    assert sites[1].block == "bert.encoder.layer.1"
    assert activation_sites(model.bert)[1].name == "encoder.layer.1.intermediate.intermediate_act_fn"  # a BertModel
    # The backbone-relative spelling of earlier versions names the same site, under its new name.
    old = "encoder.layer.1.intermediate.intermediate_act_fn"
    assert activation_sites(model, [old]) == [sites[1]]
    stats = activation_statistics(model, [_bert_batch()], activation_sites(model, [old]))
    assert list(stats) == [sites[1].name]
    linearized = linearize(model, stats[sites[1].name])
    record = hf_collapse.collapse_record(linearized)
    assert record["edits"][0]["site"] == sites[1].name
    # A record written by the previous version (site relative to the backbone) still reloads exactly.
    linearized.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hf_collapse"]["edits"][0]["site"] = old
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**_bert_batch()).logits, linearized.eval()(**_bert_batch()).logits, atol=1e-5, rtol=0
        )
    assert hf_collapse.collapse_record(reloaded) == record  # replayed under the new name


def test_site_names_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    site = activation_sites(peft_model)[0]
    assert site.name == "base_model.model.bert.encoder.layer.0.intermediate.intermediate_act_fn"
    assert (
        peft_model.get_submodule(site.activation)
        is peft_model.base_model.model.bert.encoder.layer[0].intermediate.intermediate_act_fn
    )
    # The names the inner model and older versions use name the same site.
    assert activation_sites(peft_model, ["bert.encoder.layer.0.intermediate.intermediate_act_fn"]) == [site]
    assert activation_sites(peft_model, ["encoder.layer.0.intermediate.intermediate_act_fn"]) == [site]
    stats = activation_statistics(peft_model, [_bert_batch()], [site])[site.name]
    # The record belongs to the wrapped transformers model: its site is named relative to that model.
    linearized = linearize(peft_model, stats)
    assert (
        hf_collapse.collapse_record(linearized)["edits"][0]["site"]
        == "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    )


@pytest.mark.parametrize("case_name", ["unet", "llama"])
def test_gated_activations_are_refused(case_name):
    model = CASES_BY_NAME[case_name].build()
    with pytest.raises(ValueError, match="gated"):
        activation_sites(model)
    site = adapter_for(model).activation_sites(adapter_for(model).backbone(model))[0]
    with pytest.raises(ValueError, match="bilinear"):
        activation_sites(model, [site.name])
    with pytest.raises(ValueError, match="gated"):
        compress(model, TLCConfig(), toy_dataset())


def _args(tmp_path, **kw):
    return TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        save_strategy="no",
        **kw,
    )


def test_compress_stops_at_the_target_and_leaves_the_model_alone(tmp_path):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    compressed, report = compress(
        model,
        TLCConfig(num_units=2, calibration_batches=2, finetune_steps=2),
        toy_dataset(),
        toy_dataset(8, seed=1),
        _args(tmp_path),
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(report.removed) == 2 and report.metric_name == "accuracy"
    edits = hf_collapse.collapse_record(compressed)["edits"]
    assert [e["site"] for e in edits] == [r["name"] for r in report.removed]
    assert all("neurons_on" in s.details for s in report.steps[1:])
    compressed.save_pretrained(tmp_path / "saved")
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "saved")
    batch = PadOnlyCollator()([toy_dataset(2)[i] for i in range(2)])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, compressed.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_compress_never_returns_a_model_over_the_budget(tmp_path):
    model = tiny_bert()
    compressed, report = compress(
        model,
        TLCConfig(max_metric_delta=0.0, calibration_batches=2),
        toy_dataset(),
        toy_dataset(8, seed=1),
        _args(tmp_path, metric_for_best_model="loss", greater_is_better=False),
        data_collator=PadOnlyCollator(),
    )
    kept = report.kept_steps
    assert all(s.metric <= report.steps[0].metric + 1e-9 for s in kept)
    if not report.steps[-1].kept:
        assert report.steps[-1].metric > report.steps[0].metric
    assert (
        len(hf_collapse.collapse_record(compressed)["edits"] if hf_collapse.collapse_record(compressed) else [])
        == len(kept) - 1
    )


def test_compress_until_nothing_is_left(tmp_path):
    compressed, report = compress(
        tiny_bert(),
        TLCConfig(calibration_batches=1, candidates_per_step=3),
        toy_dataset(),
        None,
        _args(tmp_path),
        data_collator=PadOnlyCollator(),
    )
    assert report.after.removed == 3 and report.metric_name == "loss"
    with pytest.raises(ValueError, match="no activation site can be linearized"):
        activation_sites(compressed)


def test_config_refusals():
    for kwargs, message in [
        (dict(calibration_batches=0), "calibration_batches"),
        (dict(num_units=0), "num_units"),
        (dict(max_metric_delta=-1), "max_metric_delta"),
        (dict(finetune_steps=-2), "finetune_steps"),
        (dict(candidates_per_step=0), "candidates_per_step"),
    ]:
        with pytest.raises(ValueError, match=message):
            TLCConfig(**kwargs)
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        compress(tiny_bert(), TLCConfig(max_metric_delta=0.1), toy_dataset())
    with pytest.raises(ValueError, match="unknown activation site"):
        activation_sites(tiny_bert(), ["nope"])


class _Probe(Exception):
    pass


def _device_probe(model):
    """Record the devices of the tensors each forward pass gets, and stop it there."""
    seen = []

    def hook(module, args, kwargs):
        seen.extend(v.device.type for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor))
        raise _Probe

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_calibration_batches_go_to_the_models_device(tmp_path):
    """The Trainer moves the model to ``args.device`` but TLC builds its calibration batches itself (on the CPU):
    they must follow the model. A model on the ``meta`` device stands in for a GPU on a CPU-only machine."""
    batch = PadOnlyCollator()([toy_dataset(4)[i] for i in range(4)])
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path))
    on_meta = tiny_bert().to("meta")
    seen = _device_probe(on_meta)
    with pytest.raises(_Probe):
        calibration_loss(trainer, on_meta, [batch])  # the loss of every candidate and of the reference
    with pytest.raises(_Probe):
        activation_statistics(on_meta, [batch])
    assert len(seen) >= 4 and set(seen) == {"meta"}

"""MSWPenalty, the LaCoOT penalty in any training loop: a plain PyTorch loop, an accelerate loop, FSDP2 (2 ranks,
torchrun, gloo), checkpointing, masking; and LaCoOTTrainer computing exactly the same penalty (one implementation)."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from toy_training import PadOnlyCollator, penalized_loop, tiny_bert, toy_dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_collapse import LaCoOTArguments, LaCoOTTrainer, MSWPenalty
from hf_collapse.block_io import BlockIO, feature_mask
from hf_collapse.ot import max_sliced_wasserstein

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = [f"bert.encoder.layer.{i}" for i in range(3)]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )


def bert_batch(seed=0, n=4):
    rows = toy_dataset(n, seed=seed)
    return PadOnlyCollator()([rows[i] for i in range(n)])  # dynamic padding: some rows padded


def loader(n=16, batch=4):
    return DataLoader(toy_dataset(n), batch_size=batch, shuffle=False, collate_fn=PadOnlyCollator())


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------------------------------------ the value itself
@pytest.mark.parametrize("slicing,reduction", [("ascent", "mean"), ("random", "sum")])
def test_values_are_max_sliced_wasserstein_of_the_captured_features(slicing, reduction):
    model = tiny_bert()
    penalty = MSWPenalty(model, slicing=slicing, n_projections=7, ascent_steps=3, reduction=reduction, seed=3)
    batch = bert_batch()
    assert penalty.block_names == BLOCKS and penalty.last_values() == {}
    with penalty.capture(inputs=batch):
        model(**batch)
    value = penalty()
    penalty.remove()

    io = BlockIO(model, penalty.blocks, detach=True)
    with io.capturing(attention_mask=batch["attention_mask"].bool()):
        model(**batch)
    expected = {}
    for i, name in enumerate(BLOCKS):
        x, y = io.features(name)
        expected[name] = float(
            max_sliced_wasserstein(
                x, y, slicing=slicing, n_projections=7, ascent_steps=3, generator=torch.Generator().manual_seed(3 + i)
            )
        )
    io.remove()
    assert penalty.last_values() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    reduced = sum(expected.values()) / (3 if reduction == "mean" else 1)
    assert float(value.detach()) == pytest.approx(reduced, rel=1e-5)
    assert value.dtype == torch.float32 and value.dim() == 0 and all(v > 0 for v in expected.values())


def test_gradient_reaches_every_block_and_nothing_after_the_last():
    model = tiny_bert()
    penalty = MSWPenalty(model)
    batch = bert_batch()
    with penalty.capture(inputs=batch):
        model(**batch)
    penalty().backward()
    for name in BLOCKS:
        block = model.get_submodule(name)
        assert all(p.grad is not None for p in block.parameters()), name
        assert sum(float(p.grad.abs().sum()) for p in block.parameters()) > 0, name
    assert model.classifier.weight.grad is None  # the head is outside every penalized block


def test_recorded_features_are_released_once_the_distances_are_built():
    """Nothing the penalty recorded outlives the backward pass (optimizer step, evaluation, checkpointing)."""
    import gc
    import weakref

    model = tiny_bert()
    penalty = MSWPenalty(model)
    batch = bert_batch()
    recorded = []
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output: recorded.append(
                weakref.ref(output[0] if isinstance(output, tuple) else output)
            )
        )
        for name in BLOCKS
    ]
    with penalty.capture(inputs=batch):
        loss = model(**batch).loss
    loss = loss + penalty()
    for handle in handles:
        handle.remove()
    assert penalty.block_io.captured() == []
    loss.backward()
    del loss
    gc.collect()
    assert len(recorded) == 3 and all(ref() is None for ref in recorded)


@pytest.mark.parametrize("granularity", ["attention", "mlp"])
def test_sub_layer_penalty_under_gradient_checkpointing(granularity):
    """Non-reentrant checkpointing gives the gradient of an uncheckpointed step; reentrant checkpointing runs the
    layer without autograd, so the sub-layer features carry no gradient: refused, saying what to use instead."""
    ids = torch.randint(3, 50, (4, 9), generator=torch.Generator().manual_seed(0))

    def gradients(checkpointing):
        model = tiny_llama().train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        penalty = MSWPenalty(model, granularity=granularity, slicing="random")
        with penalty.capture(inputs={"input_ids": ids}):
            model(input_ids=ids)
        penalty().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = gradients(None)
    branch = "self_attn.o_proj.weight" if granularity == "attention" else "mlp.down_proj.weight"
    assert float(expected[f"model.layers.1.{branch}"].norm()) > 0
    checkpointed = gradients(False)
    for name, grad in expected.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(RuntimeError, match="use_reentrant=True.*use_reentrant': False"):
        gradients(True)


def test_data_parallel_is_refused_with_what_to_use_instead(tmp_path):
    """nn.DataParallel's replicas share the forward hooks: refused, at creation, when the Trainer would use it, and
    when a replica (made as DataParallel makes them) runs a hook."""
    model = tiny_bert()
    with pytest.raises(ValueError, match="DataParallel.*torchrun"):
        MSWPenalty(torch.nn.DataParallel(model))
    trainer = LaCoOTTrainer(
        model=model,
        args=LaCoOTArguments(str(tmp_path), use_cpu=True, report_to=[]),
        train_dataset=toy_dataset(4),
        data_collator=PadOnlyCollator(),
    )
    with pytest.raises(ValueError, match="DataParallel.*torchrun"):
        trainer.compute_loss(torch.nn.DataParallel(model).train(), bert_batch())
    penalty = MSWPenalty(model)
    # What torch.nn.parallel.replicate builds on each device (here on the CPU, sharing the parameters): a copy of
    # every module, hooks included, wired to the copies of its children.
    replicas = {module: module._replicate_for_data_parallel() for module in model.modules()}
    for module, replica in replicas.items():
        replica._parameters = dict(module._parameters)
        replica._modules = {name: replicas[child] for name, child in module._modules.items()}
    replica = replicas[model]
    with pytest.raises(RuntimeError, match="DataParallel.*accelerate launch"):
        with penalty.capture(inputs=bert_batch()):
            replica(**bert_batch())


def test_calling_without_a_capture_says_what_to_do():
    model = tiny_bert()
    penalty = MSWPenalty(model)
    model(**bert_batch())  # outside capture: the hooks record nothing
    with pytest.raises(RuntimeError, match="capture"):
        penalty()
    with pytest.raises(ValueError, match="slicing"):
        MSWPenalty(model, slicing="best")
    with pytest.raises(ValueError, match="reduction"):
        MSWPenalty(model, reduction="max")


def test_trainer_penalty_is_msw_penalty_on_the_same_batch_and_seed(tmp_path):
    """No second implementation: the Trainer's penalty, step after step (warm starts included), is MSWPenalty's."""
    model, twin = tiny_bert(), tiny_bert()
    args = LaCoOTArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        seed=5,
        msw_weight=1.0,
        msw_ascent_steps=2,
        msw_projections=9,
        msw_reduction="sum",
    )
    trainer = LaCoOTTrainer(model=model, args=args)
    assert isinstance(trainer.penalty, MSWPenalty) and [b.name for b in trainer.msw_blocks] == BLOCKS
    penalty = MSWPenalty(twin, ascent_steps=2, n_projections=9, reduction="sum", seed=5)
    model.train(), twin.train()
    for seed in (0, 1, 2):  # three steps: the warm-started ascent must follow the same path
        batch = bert_batch(seed)
        with torch.no_grad():
            penalized = trainer.compute_loss(model, dict(batch))
            task = model(**batch).loss
            with penalty.capture(inputs=batch):
                twin(**batch)
            value = penalty()
        assert float(penalized - task) == pytest.approx(float(value), rel=1e-5, abs=1e-6)
        assert trainer.penalty.last_values() == pytest.approx(penalty.last_values(), rel=1e-6)
    for name in BLOCKS:
        torch.testing.assert_close(trainer.penalty.directions[name], penalty.directions[name])


# ------------------------------------------------------------------------------------------------------- masking
def test_padding_is_excluded():
    model = tiny_bert()
    batch = bert_batch()
    assert (batch["attention_mask"] == 0).any()
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 42)}

    def value(b, **capture_kwargs):
        penalty = MSWPenalty(model, slicing="random", seed=0)
        with torch.no_grad(), penalty.capture(**capture_kwargs):
            model(**b)
        result = float(penalty())
        penalty.remove()
        return result

    assert value(batch, inputs=batch) == pytest.approx(value(other, inputs=other), rel=1e-6)
    assert value(batch, attention_mask=batch["attention_mask"]) == value(batch, inputs=batch)
    assert value(batch) != pytest.approx(value(other), rel=1e-3)  # unmasked, the padding's features do count


def test_ignored_labels_are_excluded_in_a_causal_lm():
    """Positions whose prediction is not trained (-100 at t + 1) add nothing: changing their tokens (which, in a causal
    LM, no earlier position sees) leaves the penalty unchanged, unless the labels are left out of the capture."""
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    attention = torch.ones_like(ids)
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100], [-100, 12, 13, 14, 15, -100]])
    changed = ids.clone()
    changed[0, 3:] = torch.tensor([30, 31, 32])  # row 0: positions 3.. predict -100 labels (or nothing)
    changed[1, 5] = 33  # the last position predicts nothing

    def value(input_ids, **capture_kwargs):
        penalty = MSWPenalty(model, slicing="random", seed=0)
        with torch.no_grad(), penalty.capture(**capture_kwargs):
            model(input_ids=input_ids, attention_mask=attention)
        result = float(penalty())
        penalty.remove()
        return result

    masked = value(ids, inputs={"input_ids": ids, "attention_mask": attention, "labels": labels})
    assert masked == pytest.approx(
        value(changed, inputs={"input_ids": changed, "attention_mask": attention, "labels": labels}), abs=1e-6
    )
    assert masked == value(ids, attention_mask=attention, labels=labels)  # the tensors, without the batch dict
    assert value(ids, attention_mask=attention) != pytest.approx(value(changed, attention_mask=attention), abs=1e-4)
    mask = feature_mask(model, {"input_ids": ids, "attention_mask": attention, "labels": labels})
    assert mask.tolist() == [[False, True, True, False, False, False], [True, True, True, True, False, False]]


# ------------------------------------------------------------------------------------------------ training loops


def test_accelerate_loop_is_the_plain_loop_and_lowers_the_msw():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    reference_model = tiny_bert()
    reference, _ = penalized_loop(reference_model, MSWPenalty(reference_model, seed=0), list(loader()) * 2)

    try:
        accelerator = Accelerator(cpu=True)
        model = tiny_bert()
        penalty = MSWPenalty(model, seed=0)  # before prepare: the hooks sit on the model's own modules
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        model, optimizer, data = accelerator.prepare(model, optimizer, loader())
        model.train()
        history = []
        for _ in range(2):
            for batch in data:
                with penalty.capture(inputs=batch):
                    loss = model(**batch).loss
                accelerator.backward(loss + 0.5 * penalty())
                optimizer.step()
                optimizer.zero_grad()
                history.append(penalty.last_values())
        trained = params(accelerator.unwrap_model(model))
        # the penalty alone, a few more steps: it drives every block towards the identity
        only_penalty = []
        batch = next(iter(data))
        for _ in range(6):
            with penalty.capture(inputs=batch):
                model(**batch)
            value = penalty()
            accelerator.backward(value)
            optimizer.step()
            optimizer.zero_grad()
            only_penalty.append(float(value.detach()))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert len(history) == len(reference) == 8
    assert all(h == pytest.approx(r, rel=1e-5) for h, r in zip(history, reference))
    torch.testing.assert_close(trained, params(reference_model), atol=1e-6, rtol=0)
    assert only_penalty[-1] < 0.7 * only_penalty[0], only_penalty


@pytest.mark.parametrize("slicing", ["ascent", "random"])
def test_state_dict_round_trip_resumes_exactly(tmp_path, slicing):
    batches = list(loader(24))  # 6 steps

    def fresh(seed=0):
        model = tiny_bert(seed=seed)
        return model, MSWPenalty(model, slicing=slicing, n_projections=5, ascent_steps=1, seed=0)

    full_model, penalty = fresh()
    full, _ = penalized_loop(full_model, penalty, batches)

    model, penalty = fresh()
    first, optimizer = penalized_loop(model, penalty, batches[:3])
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "penalty": penalty.state_dict()},
        tmp_path / "checkpoint.pt",
    )

    def resume(with_penalty_state):
        checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        model, penalty = fresh(seed=1)  # other initial weights: everything must come from the checkpoint
        model.load_state_dict(checkpoint["model"])
        if with_penalty_state:
            penalty.load_state_dict(checkpoint["penalty"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        optimizer.load_state_dict(checkpoint["optimizer"])
        return penalized_loop(model, penalty, batches[3:], optimizer=optimizer)[0], model

    rest, resumed = resume(True)
    assert first + rest == full  # bit for bit: same directions, same draws
    torch.testing.assert_close(params(resumed), params(full_model), atol=0, rtol=0)
    cold, _ = resume(False)
    assert cold != full[3:]  # without the penalty's state the run goes elsewhere: the state really matters

    state = penalty.state_dict()
    assert set(state) == {"directions", "generators"} and set(state["generators"]) == set(BLOCKS)
    other = MSWPenalty(tiny_bert(), blocks=["bert.encoder.layer.0"])
    with pytest.raises(ValueError, match="other blocks"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not an MSWPenalty state"):
        other.load_state_dict({"weights": 1})


def test_remove_and_context_manager_detach_the_hooks():
    model = tiny_bert()
    with MSWPenalty(model) as penalty:
        assert len(penalty.block_io._handles) == 2 * len(BLOCKS)
    assert penalty.block_io._handles == []
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0


# ----------------------------------------------------------------------------------------------------- FSDP2, CPU
@pytest.mark.slow
def test_fsdp2_two_ranks_trains_with_the_penalty_then_collapses_and_reloads(tmp_path):
    from test_distributed import torchrun
    from transformers import BertForSequenceClassification

    torchrun("lacoot_fsdp2.py", str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:  # the hooks fired on the sharded blocks, every step, every block
        assert len(rank["history"]) == 4 and all(set(h) == set(BLOCKS) for h in rank["history"])
        assert all(0 < v < float("inf") for h in rank["history"] for v in h.values())
        assert all(g > 0 for g in rank["block_grads"].values()) and set(rank["block_grads"]) == set(BLOCKS)
        assert rank["moved_by_penalty"] > 1e-3  # λ > 0 vs λ = 0 from the same start: the weights differ
    assert ranks[0]["history"] != ranks[1]["history"]  # each rank's penalty saw its own local batch...
    for name, tensor in ranks[0]["trained"].items():  # ...and the ranks hold one model
        assert torch.equal(tensor, ranks[1]["trained"][name]), name
    assert ranks[0]["scores"] == ranks[1]["scores"]  # pooled over the ranks' eval batches
    # Both ranks reading the same batches: the sharded run is the one-process run (no gradient lost or doubled).
    assert ranks[0]["same_vs_single"] < 1e-4
    for h, s in zip(ranks[0]["same_history"], ranks[0]["single_history"]):
        assert h == pytest.approx(s, rel=1e-3)
    # Gathered on rank 0: the unsharded copy is the sharded model; collapsed, saved, reloaded with plain transformers.
    assert ranks[0]["copy_vs_sharded"] < 1e-6
    assert ranks[0]["removed"] == [min(ranks[0]["scores"], key=ranks[0]["scores"].get)]
    for name, tensor in ranks[0]["trained"].items():  # unsharded_copy(all_ranks=True): the whole model on each rank
        assert torch.equal(ranks[0]["everywhere"][name], tensor) and torch.equal(ranks[1]["everywhere"][name], tensor)
    # LaCoOTTrainer.collapse on the sharded model: every rank collapses a gathered copy, identically.
    assert ranks[0]["trainer_removed"] == ranks[1]["trainer_removed"] == ranks[0]["removed"]
    assert ranks[0]["trainer_metrics"] == ranks[1]["trainer_metrics"] and len(ranks[0]["trainer_metrics"]) == 2
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "collapsed").eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = reloaded(**ranks[0]["probe"]).logits
    torch.testing.assert_close(logits, ranks[0]["collapsed_logits"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- accelerate FSDP2 config
def test_fsdp2_accelerate_config_loads_and_configures_fsdp2(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = os.path.join(ROOT, "examples", "accelerate_configs", "fsdp2.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
    parser = launch_command_parser()
    options = {option for action in parser._actions for option in action.option_strings}
    assert not [key for key in config.fsdp_config if f"--{key}" not in options]  # every key is a launch option
    # What `accelerate launch` hands the processes, read back by the plugin the Accelerator builds.
    args = _validate_launch_command(parser.parse_args(["--config_file", path, "script.py"]))[0]
    for key, value in prepare_multi_gpu_env(args).items():
        if "FSDP" in key:
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy" and plugin.reshard_after_forward is True


# ------------------------------------------------------------------------------------------------------- example
@pytest.mark.slow
def test_custom_loop_example_runs(tmp_path):
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "lacoot_custom_loop.py"),
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "3",
        "--eval_examples",
        "32",
        "--num_units",
        "1",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "msw_total" in result.stdout
    from transformers import AutoModelForSequenceClassification

    collapsed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "collapsed")
    assert collapsed.config.num_hidden_layers == 5
    assert (tmp_path / "report" / "report.json").is_file()

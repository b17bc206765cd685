"""LaCoOTTrainer with the real transformers Trainer on a tiny BERT: loss terms, scaling, hooks, logging."""

import math

import pytest
import torch
from toy_training import PadOnlyCollator, accuracy, tiny_bert, toy_dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_collapse
from hf_collapse import LaCoOTArguments, LaCoOTTrainer


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return settings


def test_arguments_parse_with_hf_argument_parser(tmp_path):
    (args,) = HfArgumentParser(LaCoOTArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--msw_weight",
            "0.5",
            "--msw_slicing",
            "random",
            "--msw_blocks",
            "encoder.layer.0, encoder.layer.2",
            "--msw_reduction",
            "sum",
            "--use_cpu",
        ]
    )
    assert args.msw_weight == 0.5 and args.msw_slicing == "random" and args.msw_reduction == "sum"
    assert args.msw_block_names == ["encoder.layer.0", "encoder.layer.2"]
    assert LaCoOTArguments(str(tmp_path)).msw_block_names == "auto"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("msw_weight", -1.0, "msw_weight must be >= 0"),
        ("msw_slicing", "best", "msw_slicing must be one of"),
        ("msw_reduction", "max", "msw_reduction must be one of"),
        ("msw_projections", 0, "msw_projections must be >= 1"),
    ],
)
def test_arguments_refuse_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        LaCoOTArguments(str(tmp_path), **{field: value})


def test_trainer_refuses_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="LaCoOTArguments"):
        LaCoOTTrainer(model=tiny_bert(), args=TrainingArguments(**make_args(tmp_path)))


def test_unknown_msw_block_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown block"):
        LaCoOTTrainer(model=tiny_bert(), args=LaCoOTArguments(**make_args(tmp_path), msw_blocks="encoder.layer.7"))


def _train(trainer_cls, args, seed=0, data=None):
    model = tiny_bert(seed)
    trainer = trainer_cls(model=model, args=args, train_dataset=data or toy_dataset(), data_collator=PadOnlyCollator())
    trainer.train()
    return trainer, model


def test_zero_weight_reproduces_plain_trainer_exactly(tmp_path):
    plain, plain_model = _train(Trainer, TrainingArguments(**make_args(tmp_path / "plain")))
    lacoot, lacoot_model = _train(LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path / "lacoot"), msw_weight=0.0))
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(plain) == losses(lacoot) and len(losses(plain)) == 4
    for (name, a), b in zip(plain_model.state_dict().items(), lacoot_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_penalty_is_added_and_logged_per_block(tmp_path):
    plain, _ = _train(LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path / "a"), msw_weight=0.0))
    trainer, _ = _train(LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path / "b"), msw_weight=1.0))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(
        {"msw/bert.encoder.layer.0", "msw/bert.encoder.layer.1", "msw/bert.encoder.layer.2", "msw_total"} <= set(h)
        for h in logs
    )
    first = logs[0]
    total = first["msw_total"]
    assert total > 0
    assert math.isclose(total, sum(first[f"msw/bert.encoder.layer.{i}"] for i in range(3)) / 3, rel_tol=1e-4)
    plain_first = [h for h in plain.state.log_history if "loss" in h][0]["loss"]
    assert first["loss"] == pytest.approx(plain_first + total, rel=1e-3)


def test_warmup_ramps_lambda_from_zero_with_the_steps(tmp_path):
    """msw_warmup_ratio = 1 over 4 steps: λ is 0, 1/4, 2/4, 3/4 of msw_weight at the steps' starts. The first
    step's loss is then the plain loss, and each logged weight is the one that step used (not the next step's)."""
    plain, _ = _train(LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path / "a"), msw_weight=0.0))
    ramped, _ = _train(
        LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path / "b"), msw_weight=2.0, msw_warmup_ratio=1.0)
    )
    logs = [h for h in ramped.state.log_history if "loss" in h]
    plain_logs = [h for h in plain.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(plain_logs[0]["loss"], rel=1e-6)  # λ = 0 at step 0
    assert [h["msw_weight"] for h in logs] == [0.0, 0.5, 1.0, 1.5]  # each log: the λ its steps applied
    assert ramped.current_msw_weight == 2.0
    constant = LaCoOTTrainer(model=tiny_bert(), args=LaCoOTArguments(**make_args(tmp_path / "c"), msw_weight=2.0))
    assert constant.current_msw_weight == 2.0
    with pytest.raises(ValueError, match="msw_warmup_ratio must lie in"):
        LaCoOTArguments(str(tmp_path), msw_warmup_ratio=1.5)


# λ under gradient accumulation and DDP, resume and publishing: tests/test_lacoot_lifecycle.py.


def _loss_and_grad(tmp_path, inputs, **overrides):
    model = tiny_bert()
    if overrides.pop("checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = LaCoOTTrainer(
        model=model, args=LaCoOTArguments(**make_args(tmp_path), **overrides), data_collator=PadOnlyCollator()
    )
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    return loss.detach(), model.bert.encoder.layer[0].attention.self.query.weight.grad.clone()


def _batch(padded_value):
    ids = torch.tensor([[5, 6, 7, 8, 9], [30, 31, 32, padded_value, padded_value]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}


def test_padding_tokens_do_not_change_the_penalty(tmp_path):
    loss_a, grad_a = _loss_and_grad(tmp_path, _batch(0))
    loss_b, grad_b = _loss_and_grad(tmp_path, _batch(44))
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=0)


def test_gradient_checkpointing_counts_the_penalty_once(tmp_path):
    loss_a, grad_a = _loss_and_grad(tmp_path, _batch(0))
    loss_b, grad_b = _loss_and_grad(tmp_path, _batch(0), checkpointing=True)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_keeps_the_distance_in_float32(tmp_path):
    trainer, model = _train(LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path), bf16=True, msw_weight=1.0))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["msw_total"]) and h["msw_total"] > 0 for h in logs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        batch = _batch(0)
        with trainer.penalty.capture(inputs=batch):
            model(**batch)
        penalty, _ = trainer.msw_penalty()
    assert penalty.dtype == torch.float32


def test_block_scores_are_deterministic_and_collapse_follows_them(tmp_path):
    args = LaCoOTArguments(**make_args(tmp_path), msw_weight=1.0, eval_strategy="no")
    model = tiny_bert()
    trainer = LaCoOTTrainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(),
        eval_dataset=toy_dataset(8, seed=1),
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
    )
    trainer.train()
    scores = trainer.block_scores()
    assert scores == trainer.block_scores()
    assert set(scores) == {"bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"}
    collapsed, report = trainer.collapse(num_units=2, latency_repeats=1)
    expected = sorted(scores, key=scores.get)[:2]
    assert [r["name"] for r in report.removed] == expected
    assert collapsed.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 3
    assert report.metric_name == "accuracy" and all(s.metric is not None for s in report.steps)
    assert report.steps[0].params > report.steps[2].params
    collapsed.save_pretrained(tmp_path / "collapsed")
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")
    batch = _batch(0)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, collapsed.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_trainer_model_card_replaces_the_generic_one(tmp_path):
    trainer, _ = _train(LaCoOTTrainer, LaCoOTArguments(**make_args(tmp_path), msw_weight=0.5))
    trainer.collapse(num_units=1, scores={"encoder.layer.0": 0.1, "encoder.layer.1": 0.2}, latency_repeats=1)
    trainer.create_model_card(model_name="tiny-lacoot")
    card = (tmp_path / "README.md").read_text()
    assert "hf-collapse" in card and "lacoot" in card and "λ = 0.5" in card and "encoder.layer.0" in card

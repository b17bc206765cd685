"""LaCoOTTrainer across the joints users chain: λ under gradient accumulation, resume from a checkpoint, and
publishing (save_model / push_to_hub) after a collapse. The real Trainer throughout; the Hub is the local
stand-in (tests/test_hub.py's fixture), pulled back with the real client."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_hub import hub  # noqa: F401  (the local Hub stand-in fixture)
from torch.utils.data import DataLoader
from toy_training import PadOnlyCollator, accuracy, tiny_bert, toy_dataset
from transformers import BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hf_collapse import LaCoOTArguments, LaCoOTTrainer
from hf_collapse.ot import max_sliced_wasserstein, random_directions


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
    return LaCoOTArguments(**settings)


class FixedDirectionTrainer(LaCoOTTrainer):
    """The penalty on fixed random directions, so that every micro-batch and run sees identical slices."""

    def msw_penalty(self):
        values = []
        for i, block in enumerate(self.msw_blocks):
            x, y = self._block_io.features(block.name)
            directions = random_directions(x.shape[1], 8, generator=torch.Generator().manual_seed(i))
            values.append(max_sliced_wasserstein(x, y, slicing="random", directions=directions))
        return torch.stack(values).mean(), {}


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


class CausalCollator:
    """Pads with zeros; labels are the input ids with -100 on padding (the model shifts them)."""

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([f["input_ids"] + [0] * (length - len(f["input_ids"])) for f in features])
        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


TASKS = {"classifier": (tiny_bert, PadOnlyCollator), "causal_lm": (tiny_llama, CausalCollator)}


def _one_step(tmp_path, task, weight, accumulation, batch=4, **overrides):
    """Weights after one SGD step over `accumulation` identical micro-batches of `batch` samples (under torchrun,
    every rank reads the same micro-batches: the dataloader is not sharded)."""
    build, collator = TASKS[task]
    data = toy_dataset(batch)
    data = Dataset.from_dict({k: list(data[k]) * accumulation for k in data.column_names})  # identical copies
    args = make_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        msw_weight=weight,
        **overrides,
    )
    model = build()
    trainer = FixedDirectionTrainer(model=model, args=args, train_dataset=data, data_collator=collator())
    trainer.get_train_dataloader = lambda: DataLoader(data, batch_size=batch, shuffle=False, collate_fn=collator())
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("task", ["classifier", "causal_lm"])
def test_lambda_means_the_same_under_gradient_accumulation(tmp_path, task):
    """One step over two identical micro-batches (GA=2) moves the weights like one step over one (GA=1), up to the
    factor by which the Trainer itself scales the task loss (2 for a local-mean loss, 1 for a causal LM's)."""
    start = torch.cat([p.detach().flatten() for p in TASKS[task][0]().parameters()])
    task_only = {ga: _one_step(tmp_path / f"t{ga}", task, 0.0, ga) - start for ga in (1, 2)}
    factor = float(task_only[2].norm() / task_only[1].norm())
    torch.testing.assert_close(task_only[2], factor * task_only[1], atol=1e-6, rtol=1e-4)
    assert factor == pytest.approx(2.0 if task == "classifier" else 1.0, rel=1e-4)

    with_penalty = {ga: _one_step(tmp_path / f"p{ga}", task, 1.0, ga) - start for ga in (1, 2)}
    penalty_part = (with_penalty[1] - task_only[1]).norm()
    assert penalty_part > 1e-3 * task_only[1].norm()  # the penalty really moved the weights
    error = (with_penalty[2] / factor - with_penalty[1]).norm() / penalty_part
    assert error < 1e-3, f"penalty weight at GA=2 differs by {error:.3f} of its contribution"


class PromptOnlyCollator(CausalCollator):
    """SFT-style batches: examples flagged ``prompt_only`` had their response truncated away (every label -100)."""

    def __call__(self, features):
        batch = super().__call__(features)
        prompt_only = torch.tensor([bool(f["prompt_only"]) for f in features])
        batch["labels"][prompt_only] = -100
        return batch


def _sft_step(tmp_path, prompt_only_first: bool, weight: float, batch: int = 4, **overrides):
    """One SGD step (GA=2) of a causal LM over a micro-batch with nothing to train and a normal one, in either order."""
    ids = list(toy_dataset(2 * batch)["input_ids"])
    trained, prompts = ids[:batch], ids[batch:]
    ids = prompts + trained if prompt_only_first else trained + prompts
    flags = [prompt_only_first] * batch + [not prompt_only_first] * batch
    data = Dataset.from_dict({"input_ids": ids, "prompt_only": flags})
    args = make_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        max_steps=1,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        msw_weight=weight,
        remove_unused_columns=False,
        **overrides,
    )
    model = tiny_llama()
    trainer = FixedDirectionTrainer(model=model, args=args, train_dataset=data, data_collator=PromptOnlyCollator())
    trainer.get_train_dataloader = lambda: DataLoader(
        data, batch_size=batch, shuffle=False, collate_fn=PromptOnlyCollator()
    )
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer.task_loss_normalization


def test_lambda_does_not_depend_on_which_micro_batch_comes_first(tmp_path):
    """A first micro-batch with no trained token (loss 0) cannot say how the loss is normalised: the scale is decided
    on a batch that can, so the step is the same whichever micro-batch comes first."""
    runs = {order: _sft_step(tmp_path / f"o{order}", order, 1.0) for order in (True, False)}
    assert runs[True][1] == runs[False][1] == "num_items_in_batch"
    task_only = _sft_step(tmp_path / "task", False, 0.0)[0]
    start = torch.cat([p.detach().flatten() for p in tiny_llama().parameters()])
    penalty_parts = {order: runs[order][0] - task_only for order in runs}
    assert penalty_parts[False].norm() > 1e-3 * (task_only - start).norm()  # the penalty really moved the weights
    ratio = float(penalty_parts[True].norm() / penalty_parts[False].norm())
    assert ratio == pytest.approx(1.0, abs=1e-3), f"the penalty's update is {ratio:.3f}x larger in one order"


def _resumable_args(tmp_path, **overrides):
    return make_args(
        tmp_path,
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        learning_rate=5e-3,
        msw_weight=1.0,
        msw_ascent_steps=1,
        **overrides,
    )


def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    data = toy_dataset(16)
    full = LaCoOTTrainer(
        model=tiny_bert(dropout=0.1),
        args=_resumable_args(tmp_path / "full"),
        train_dataset=data,
        data_collator=PadOnlyCollator(),
    )
    full.train()
    assert (tmp_path / "full" / "checkpoint-4" / "lacoot_penalty_state_rank0.pt").is_file()

    resumed_model = tiny_bert(seed=1, dropout=0.1)  # other initial weights: everything must come from the checkpoint
    resumed = LaCoOTTrainer(
        model=resumed_model,
        args=_resumable_args(tmp_path / "resumed"),
        train_dataset=data,
        data_collator=PadOnlyCollator(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    for (name, a), b in zip(full.model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


def test_resume_without_the_penalty_state_warns_and_still_trains(tmp_path, caplog):
    data = toy_dataset(16)
    full = LaCoOTTrainer(
        model=tiny_bert(), args=_resumable_args(tmp_path / "full"), train_dataset=data, data_collator=PadOnlyCollator()
    )
    full.train()
    (tmp_path / "full" / "checkpoint-4" / "lacoot_penalty_state_rank0.pt").unlink()  # a checkpoint of a plain Trainer
    resumed = LaCoOTTrainer(
        model=tiny_bert(),
        args=_resumable_args(tmp_path / "resumed"),
        train_dataset=data,
        data_collator=PadOnlyCollator(),
    )
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert "restarts cold" in caplog.text and resumed.state.global_step == 8


def _trained(tmp_path):
    trainer = LaCoOTTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, msw_weight=0.5),
        train_dataset=toy_dataset(),
        eval_dataset=toy_dataset(8, seed=1),
        data_collator=PadOnlyCollator(),
        compute_metrics=accuracy,
    )
    trainer.train()
    return trainer


def test_save_model_after_collapse_saves_what_the_report_describes(tmp_path):
    trainer = _trained(tmp_path / "run")
    trainer.save_model(str(tmp_path / "trained"))
    assert BertForSequenceClassification.from_pretrained(tmp_path / "trained").config.num_hidden_layers == 3

    collapsed, report = trainer.collapse(num_units=2, latency_repeats=1)
    trainer.save_model(str(tmp_path / "collapsed"))
    folder = tmp_path / "collapsed"
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "tradeoff.png",
        "collapse_report.json",
        "training_args.bin",
    } <= {p.name for p in folder.iterdir()}
    reloaded = BertForSequenceClassification.from_pretrained(folder).eval()
    assert reloaded.config.num_hidden_layers == 1 == collapsed.config.num_hidden_layers
    batch = PadOnlyCollator()([{"input_ids": [5, 6, 7, 8], "label": 0}, {"input_ids": [30, 31], "label": 1}])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, collapsed.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert json.loads((folder / "collapse_report.json").read_text())["steps"][-1]["params"] == report.after.params
    assert "2 blocks removed" in (folder / "README.md").read_text()
    assert trainer.model.config.num_hidden_layers == 3  # the trained model itself is untouched

    trainer.train()  # training again forgets the collapse: the trained model is what gets saved next
    trainer.save_model(str(tmp_path / "retrained"))
    assert BertForSequenceClassification.from_pretrained(tmp_path / "retrained").config.num_hidden_layers == 3


def test_trainer_push_to_hub_publishes_the_collapsed_model_and_its_plot(hub, tmp_path):  # noqa: F811
    store, endpoint = hub
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    script = Path(__file__).parent / "hub" / "trainer_push_roundtrip.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["trained_layers"] == 3 and found["collapsed_layers"] == found["layers"] == 1
    assert found["error"] <= 1e-5
    assert found["removed_in_card"] and found["names_in_card"] and found["plain_loading_code"]
    assert found["shown"] and set(found["shown"]) <= set(found["files"]), found
    assert {"README.md", "config.json", "model.safetensors", "tradeoff.png"} <= set(found["files"])


@pytest.mark.slow
def test_lambda_means_the_same_on_two_processes(tmp_path):
    """A 2-rank torchrun step where both ranks get the same local batch moves the weights like a 1-process step
    on that batch, up to the Trainer's own factor on the task loss (2 for a local mean, 1 for a causal LM's)."""
    from test_distributed import torchrun

    torchrun("lacoot_lambda_ddp.py", str(tmp_path))
    for task in TASKS:
        start = torch.cat([p.detach().flatten() for p in TASKS[task][0]().parameters()])
        ddp = {w: torch.load(tmp_path / f"{task}_{w}.pt") - start for w in (0.0, 1.0)}
        single = {w: _one_step(tmp_path / f"{task}{w}", task, w, 1) - start for w in (0.0, 1.0)}
        factor = float(ddp[0.0].norm() / single[0.0].norm())
        assert factor == pytest.approx(2.0 if task == "classifier" else 1.0, rel=1e-4), task
        penalty_part = (single[1.0] - single[0.0]).norm()
        assert penalty_part > 1e-3 * single[0.0].norm()
        error = (ddp[1.0] / factor - single[1.0]).norm() / penalty_part
        assert error < 1e-3, f"{task}: the penalty weight on 2 processes differs by {error:.3f} of its contribution"
    # Ranks whose first micro-batches differ (one with nothing to train) decide the loss normalisation alike.
    decided = [(tmp_path / f"normalization_rank{rank}.txt").read_text() for rank in (0, 1)]
    assert decided == ["num_items_in_batch", "num_items_in_batch"]


def test_feature_mask_keeps_real_trained_tokens():
    from hf_collapse.block_io import feature_mask

    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 6, 7, 8, 9]])
    causal = feature_mask(tiny_llama(), {"input_ids": ids, "attention_mask": attention, "labels": labels})
    # position t predicts the label at t + 1: the prompt's last token is trained, the final position never is
    assert causal.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert (
        feature_mask(
            tiny_bert(), {"input_ids": ids, "attention_mask": attention, "labels": torch.tensor([0, 1])}
        ).tolist()
        == attention.bool().tolist()
    )
    assert feature_mask(tiny_bert(), {"input_ids": ids}) is None


def test_lacoot_on_sft_data_leaves_prompt_and_padding_out_of_the_penalty(tmp_path):
    """A causal LM on SFT-style data: the penalty is the MSW of features of the tokens whose prediction is trained."""
    from hf_collapse.block_io import BlockIO, feature_mask

    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]]),
    }
    trainer = FixedDirectionTrainer(model=model, args=make_args(tmp_path, msw_weight=1.0))
    model.train()
    with torch.no_grad():
        penalized = trainer.compute_loss(model, dict(batch))
        task = model(**batch).loss
        io = BlockIO(model, trainer.msw_blocks)
        with io.capturing(attention_mask=feature_mask(model, batch)):
            model(**batch)
        expected = []
        for i, block in enumerate(trainer.msw_blocks):
            x, y = io.features(block.name)
            directions = random_directions(x.shape[1], 8, generator=torch.Generator().manual_seed(i))
            expected.append(max_sliced_wasserstein(x, y, slicing="random", directions=directions))
        io.remove()
    torch.testing.assert_close(penalized - task, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    unmasked = {**batch, "labels": ids.masked_fill(attention == 0, -100)}
    with torch.no_grad():
        assert not torch.isclose(
            trainer.compute_loss(model, dict(unmasked)) - model(**unmasked).loss, penalized - task, atol=1e-4
        )  # the prompt positions really were left out

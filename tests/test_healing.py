"""hf_collapse.heal: distillation, LoRA and linear replacement on a tiny BERT and a tiny Llama (real Trainer, peft)."""

import copy

import pytest
import torch
from datasets import Dataset
from tiny_models import llama
from toy_training import PadOnlyCollator, tiny_bert, toy_dataset
from transformers import TrainingArguments, default_data_collator

import hf_collapse
from hf_collapse.healing import DistillationTrainer, distillation_loss, heal, logit_mask, removed_spans


def lm_dataset(n=32, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0  # right padding in every third row
    labels = ids.clone()
    labels[mask == 0] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def amplify(model, modules, factor):
    """Scale the weights of ``modules``: random-init blocks are near identities and the head near uniform, so
    removal would cost nothing measurable; a teacher whose removed blocks and head matter makes healing visible."""
    with torch.no_grad():
        for name in modules:
            model.get_submodule(name).weight.mul_(factor)


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    teacher = llama().eval()
    amplify(teacher, [f"model.layers.{i}.{p}" for i in (2, 3) for p in ("self_attn.o_proj", "mlp.down_proj")], 10.0)
    amplify(teacher, ["lm_head"], 20.0)
    student = hf_collapse.remove_blocks(teacher, ["model.layers.2", "model.layers.3"])
    return teacher, student


@pytest.fixture(scope="module")
def bert_pair():
    teacher = tiny_bert(seed=0).eval()
    amplify(teacher, ["bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"], 10.0)
    amplify(teacher, ["classifier"], 50.0)
    student = hf_collapse.remove_blocks(teacher, ["bert.encoder.layer.1"])
    return teacher, student


def training_args(tmp_path, steps=30, lr=3e-3, batch=8):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=batch,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )


def batch_of(kind, n=16):
    if kind == "llama":
        dataset = lm_dataset()
        return default_data_collator([dataset[i] for i in range(n)])
    dataset = toy_dataset(n=n)
    return PadOnlyCollator()([dataset[i] for i in range(n)])


def setup(kind, pair):
    teacher, student = pair
    if kind == "llama":
        return teacher, student, lm_dataset(), default_data_collator
    return teacher, student, toy_dataset(n=32), PadOnlyCollator()


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def kl_to_teacher(student, teacher, batch, causal):
    s, t = logits(student, batch), logits(teacher, batch)
    mask = logit_mask(batch, s, causal)
    if causal:
        s, t = s[:, :-1], t[:, :-1]
    return float(distillation_loss(s, t, mask, temperature=1.0))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_reloads_exactly(model, tmp_path, batch):
    model.save_pretrained(tmp_path / "healed")
    expected = logits(model, batch)
    plain = type(model).from_pretrained(tmp_path / "healed")
    auto = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "healed")
    for reloaded in (plain, auto):
        assert type(reloaded) is type(model)
        assert hf_collapse.collapse_record(reloaded) == hf_collapse.collapse_record(model)
        torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=0)


def assert_plain_copy(healed, student):
    assert healed is not student
    assert type(healed) is type(student)
    assert hf_collapse.collapse_record(healed) == hf_collapse.collapse_record(student)
    assert [b.name for b in hf_collapse.find_blocks(healed)] == [b.name for b in hf_collapse.find_blocks(student)]
    assert state(healed).keys() == state(student).keys()
    assert not any("lora" in k for k in state(healed))


# --- linear --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_linear_replacement_brings_the_student_closer_to_the_teacher(kind, llama_pair, bert_pair, tmp_path):
    teacher, student, dataset, collator = setup(kind, llama_pair if kind == "llama" else bert_pair)
    before = state(student)
    teacher_before = state(teacher)
    healed = heal(student, teacher, dataset, method="linear", data_collator=collator, calibration_batches=4)
    assert_plain_copy(healed, student)
    assert_same_state(state(student), before)
    assert_same_state(state(teacher), teacher_before)
    # Only the projection of the kept block before the span changed.
    folded = "model.layers.1.mlp.down_proj" if kind == "llama" else "bert.encoder.layer.0.output.dense"
    changed = {k for k, v in state(healed).items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(folded) for k in changed), changed
    # On the calibration data, the last hidden state (real tokens) is closer to the teacher's.
    batch = batch_of(kind, 32)
    mask = batch["attention_mask"].bool()

    def last_hidden(model):
        with torch.no_grad():
            return model(**batch, output_hidden_states=True).hidden_states[-1][mask]

    target = last_hidden(teacher)
    error_student = (last_hidden(student) - target).pow(2).mean()
    error_healed = (last_hidden(healed) - target).pow(2).mean()
    assert error_healed < 0.9 * error_student, (error_healed, error_student)
    assert_reloads_exactly(healed, tmp_path, batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_replacement_heals_half_precision_models(dtype, llama_pair, tmp_path):
    """LLMs are loaded in bf16 / fp16: the fit is solved in float64 and the self-check allows the dtype's rounding,
    while a block that scales its branch (Granite's residual_multiplier) is still refused in that dtype."""
    teacher, student = (model.to(dtype) for model in copy.deepcopy(llama_pair))
    healed = heal(
        student, teacher, lm_dataset(), method="linear", data_collator=default_data_collator, calibration_batches=4
    )
    assert healed.dtype == dtype and student.dtype == dtype
    batch = batch_of("llama", 32)
    mask = batch["attention_mask"].bool()

    def last_hidden(model):
        with torch.no_grad():
            return model(**batch, output_hidden_states=True).hidden_states[-1][mask].float()

    target = last_hidden(teacher)
    assert (last_hidden(healed) - target).pow(2).mean() < 0.9 * (last_hidden(student) - target).pow(2).mean()
    healed.save_pretrained(tmp_path / "healed")
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "healed")
    assert reloaded.dtype == dtype
    saved = reloaded.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in healed.state_dict().items() if k in saved)  # the folded weights

    from tiny_models import granite

    torch.manual_seed(0)
    scaled = granite().eval().to(dtype)
    with pytest.raises(ValueError, match="does not add its Linear output to the stream unchanged"):
        heal(
            hf_collapse.remove_blocks(scaled, ["model.layers.2"]),
            scaled,
            lm_dataset(),
            method="linear",
            data_collator=default_data_collator,
            calibration_batches=4,
        )


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_linear_cosine_objective_fits_directions_better_than_least_squares(kind, llama_pair, bert_pair, tmp_path):
    """ReplaceMe's second objective: on the calibration tokens, the stream after the block the map is folded into
    points closer to the teacher's stream after the span (mean cosine distance, measured here from the models'
    hidden states) than with least squares, which it starts from."""
    teacher, student, dataset, collator = setup(kind, llama_pair if kind == "llama" else bert_pair)
    # hidden_states[i + 1] leaves block i: the student's folded block and the teacher's last removed block
    after_fold, after_span = (2, 4) if kind == "llama" else (1, 2)
    batch = collator([dataset[i] for i in range(32)])
    mask = batch["attention_mask"].bool()

    def direction_error(healed):
        with torch.no_grad():
            got = healed(**batch, output_hidden_states=True).hidden_states[after_fold][mask]
            want = teacher(**batch, output_hidden_states=True).hidden_states[after_span][mask]
        return float((1 - torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)).mean())

    common = dict(method="linear", data_collator=collator, calibration_batches=4)
    lstsq = heal(student, teacher, dataset, **common)
    cosine = heal(student, teacher, dataset, objective="cosine", cosine_steps=50, cosine_lr=1e-3, **common)
    assert direction_error(cosine) < direction_error(lstsq) < direction_error(student)
    still = heal(student, teacher, dataset, objective="cosine", cosine_steps=0, **common)  # no step: least squares
    assert_same_state(state(still), state(lstsq))
    assert_reloads_exactly(cosine, tmp_path, batch)
    with pytest.raises(ValueError, match="objective must be 'lstsq' or 'cosine'"):
        heal(student, teacher, dataset, objective="l1", **common)


def test_linear_fit_equals_least_squares_computed_from_full_forward_passes():
    """Two spans healed in forward order (the second fitted on the student the first already changed), each fit
    recomputed here from full forward passes (output_hidden_states and a hook on the MLP output), not from the
    library's early-stopped calibration passes."""
    torch.manual_seed(0)
    teacher = llama().eval()
    amplify(teacher, [f"model.layers.{i}.mlp.down_proj" for i in (1, 3)], 10.0)
    student = hf_collapse.remove_blocks(teacher, ["model.layers.1", "model.layers.3"])
    dataset, ridge, batches = lm_dataset(), 1e-3, 4
    healed = heal(
        student,
        teacher,
        dataset,
        method="linear",
        data_collator=default_data_collator,
        ridge=ridge,
        calibration_batches=batches,
    )
    expected = copy.deepcopy(student)
    rows = [default_data_collator([dataset[i] for i in range(b * 8, b * 8 + 8)]) for b in range(batches)]
    # (student layer the map folds into, its hidden-state index, the teacher's hidden-state index after the span)
    for layer, after_layer, after_span in ((0, 1, 2), (1, 2, 4)):
        down = expected.model.layers[layer].mlp.down_proj
        gram, cross = torch.zeros(32, 32, dtype=torch.float64), torch.zeros(32, 32, dtype=torch.float64)
        for batch in rows:
            seen = {}
            handle = down.register_forward_hook(lambda m, a, out, kept=seen: kept.__setitem__("m", out))
            with torch.no_grad():
                stream = expected(**batch, output_hidden_states=True).hidden_states[after_layer]
                target = teacher(**batch, output_hidden_states=True).hidden_states[after_span]
            handle.remove()
            real = batch["attention_mask"].bool()
            m = seen["m"][real].double()
            gram += m.T @ m
            cross += m.T @ (target[real].double() - (stream[real].double() - m))
        lam = ridge * float(torch.trace(gram)) / 32 + 1e-12
        T = torch.linalg.solve(
            gram + lam * torch.eye(32, dtype=torch.float64), cross + lam * torch.eye(32, dtype=torch.float64)
        )
        with torch.no_grad():
            down.weight.copy_((T.T @ down.weight.double()).float())
    for layer in (0, 1):
        torch.testing.assert_close(
            healed.model.layers[layer].mlp.down_proj.weight,
            expected.model.layers[layer].mlp.down_proj.weight,
            rtol=1e-4,
            atol=1e-5,
        )


def test_linear_removed_spans_follow_the_record_across_edits():
    torch.manual_seed(0)
    teacher = llama().eval()
    once = hf_collapse.remove_blocks(teacher, ["model.layers.3"])
    twice = hf_collapse.remove_blocks(once, ["model.layers.1"])  # teacher layer 1; layers renumbered after each
    spans = removed_spans(twice, teacher)
    assert [(s.teacher_blocks, s.preceding, s.teacher_preceding) for s in spans] == [
        (("model.layers.1",), "model.layers.0", "model.layers.0"),
        (("model.layers.3",), "model.layers.1", "model.layers.2"),
    ]
    # The teacher may carry the first edits itself: only the later ones are spans.
    assert [s.teacher_blocks for s in removed_spans(twice, once)] == [("model.layers.1",)]


def test_linear_refusals(llama_pair, bert_pair):
    teacher, student = llama_pair
    dataset = lm_dataset()
    with pytest.raises(ValueError, match="no blocks removed"):
        heal(teacher, teacher, dataset, method="linear")
    first = hf_collapse.remove_blocks(teacher, ["model.layers.0"])
    with pytest.raises(ValueError, match="no kept block precedes"):
        heal(first, teacher, dataset, method="linear")
    sub = hf_collapse.remove_blocks(teacher, ["model.layers.2.mlp"])
    with pytest.raises(ValueError, match="remove_sublayers"):
        heal(sub, teacher, dataset, method="linear")
    from tiny_models import gpt2

    gpt_teacher = gpt2().eval()
    gpt_student = hf_collapse.remove_blocks(gpt_teacher, ["transformer.h.2"])
    with pytest.raises(ValueError, match="no projection a linear replacement can be folded into exactly"):
        heal(gpt_student, gpt_teacher, dataset, method="linear")
    other = llama()
    with pytest.raises(ValueError, match="not collapsed from this teacher"):
        heal(student, hf_collapse.remove_blocks(other, ["model.layers.4"]), dataset, method="linear")


def test_bad_input_is_refused(llama_pair, bert_pair, tmp_path):
    teacher, student = llama_pair
    with pytest.raises(ValueError, match="unknown healing method 'prune'.*distill, lora, linear"):
        heal(student, teacher, lm_dataset(), method="prune")
    with pytest.raises(ValueError, match="'bert' model.*student is a 'decoder' model"):
        heal(student, bert_pair[0], lm_dataset(), method="distill", args=training_args(tmp_path))
    with pytest.raises(ValueError, match="TrainingArguments"):
        heal(student, teacher, lm_dataset(), method="lora")
    with pytest.raises(ValueError, match="needs the uncollapsed teacher"):
        heal(student, None, lm_dataset(), method="distill", args=training_args(tmp_path))
    with pytest.raises(ValueError, match="needs the uncollapsed teacher"):  # LoRA distilling needs one too
        heal(student, None, lm_dataset(), method="lora", args=training_args(tmp_path), distill_alpha=0.5)
    from hf_collapse.healing.lora import lora

    with pytest.raises(ValueError, match="pass the uncollapsed teacher"):  # the method's own check, called directly
        lora(copy.deepcopy(student), lm_dataset(), training_args(tmp_path), distill_alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        DistillationTrainer(model=student, teacher=teacher, args=training_args(tmp_path), alpha=2.0)


# --- distillation --------------------------------------------------------------------------------------------


def test_distillation_loss_ignores_padding_and_masked_labels_with_the_causal_shift():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    inputs = {
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[1, 2, -100, 4, 5], [1, 2, 3, -100, -100]]),
    }
    causal_mask = logit_mask(inputs, student, causal=True)
    # Position t predicts label t + 1: row 0 drops position 1 (label 2 is -100), row 1 keeps positions 0 and 1.
    assert causal_mask.tolist() == [[True, False, True, True], [True, True, False, False]]
    assert logit_mask(inputs, student, causal=False).tolist() == [
        [True, True, False, True, True],
        [True, True, True, False, False],
    ]
    left = {"attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}  # left padding: position 1 is a
    assert logit_mask(left, student, causal=True).tolist() == [
        [False, False, True, True],  # pad predicting the first
        [True, True, True, True],
    ]  # real token: not counted
    loss = distillation_loss(student[:, :-1], teacher[:, :-1], causal_mask, 2.0)
    changed = student.clone()
    changed[0, 1, 0] += 5.0  # excluded: its target is -100
    changed[1, 2:, 1] -= 3.0  # excluded: padding
    changed[:, -1, 2] += 1.0  # excluded: the last position predicts nothing
    assert torch.allclose(distillation_loss(changed[:, :-1], teacher[:, :-1], causal_mask, 2.0), loss)
    changed[0, 0, 0] += 1.0  # counted (one logit: a constant shift would not change the softmax)
    assert not torch.allclose(distillation_loss(changed[:, :-1], teacher[:, :-1], causal_mask, 2.0), loss)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind,method", [("llama", "distill"), ("bert", "distill"), ("llama", "lora")])
def test_distill_reduces_the_kl_to_the_teacher(kind, method, llama_pair, bert_pair, tmp_path):
    """Full-parameter distillation, and LoRA whose loss is the same KL (``distill_alpha=1``)."""
    teacher, student, dataset, collator = setup(kind, llama_pair if kind == "llama" else bert_pair)
    before, teacher_before = state(student), state(teacher)
    batch = batch_of(kind, 32)
    causal = kind == "llama"
    settings = dict(alpha=1.0, args=training_args(tmp_path, steps=25, lr=5e-4))
    if method == "lora":
        settings = dict(distill_alpha=1.0, r=4, args=training_args(tmp_path, steps=30, lr=1e-2))
    healed = heal(student, teacher, dataset, method=method, data_collator=collator, temperature=2.0, **settings)
    assert_plain_copy(healed, student)
    assert_same_state(state(student), before)
    if method == "lora":  # only the kept blocks' linears changed (the adapters, merged)
        changed = {k for k, v in state(healed).items() if not torch.equal(v, before[k])}
        assert changed and all(k.startswith("model.layers.") and k.endswith(".weight") for k in changed), changed
    assert_same_state(state(teacher), teacher_before)
    assert not teacher.training
    kl_before, kl_after = kl_to_teacher(student, teacher, batch, causal), kl_to_teacher(healed, teacher, batch, causal)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert_reloads_exactly(healed, tmp_path, batch)


def test_distillation_trainer_on_its_own_with_hidden_state_matching(llama_pair, tmp_path):
    teacher, student = llama_pair
    student = copy.deepcopy(student)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=training_args(tmp_path, steps=3),
        train_dataset=lm_dataset(),
        data_collator=default_data_collator,
        hidden_weight=1.0,
    )
    assert trainer.causal
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))


# --- LoRA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_lora_lowers_the_loss_and_merges_into_the_kept_blocks(kind, llama_pair, bert_pair, tmp_path):
    teacher, student, dataset, collator = setup(kind, llama_pair if kind == "llama" else bert_pair)
    before = state(student)
    batch = batch_of(kind, 32)
    healed = heal(
        student,
        teacher,
        dataset,
        method="lora",
        args=training_args(tmp_path, steps=30, lr=1e-2),
        data_collator=collator,
        r=4,
    )
    assert_plain_copy(healed, student)
    assert_same_state(state(student), before)
    after = state(healed)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    block_prefix = "model.layers." if kind == "llama" else "bert.encoder.layer."
    assert changed and all(k.startswith(block_prefix) and k.endswith(".weight") for k in changed), changed
    assert any(".1." in k for k in changed)  # a kept block that follows the removal
    with torch.no_grad():
        loss_before = float(student.eval()(**batch).loss)
        loss_after = float(healed.eval()(**batch).loss)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    assert_reloads_exactly(healed, tmp_path, batch)


def test_lora_target_modules_restrict_the_changed_weights(llama_pair, tmp_path):
    teacher, student = llama_pair
    before = state(student)
    healed = heal(
        student,
        teacher,
        lm_dataset(),
        method="lora",
        args=training_args(tmp_path, steps=2, lr=1e-2),
        data_collator=default_data_collator,
        r=2,
        target_modules=["q_proj"],
    )
    changed = {k for k, v in state(healed).items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("self_attn.q_proj.weight") for k in changed), changed
    with pytest.raises(ValueError, match="no nn.Linear"):
        heal(student, teacher, lm_dataset(), method="lora", args=training_args(tmp_path), target_modules=["nope"])

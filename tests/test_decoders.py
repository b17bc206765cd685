"""The generic decoder adapter: any decoder-only causal LM, recognised by structure.

Each family is a tiny random-init model of the real transformers class (tests/tiny_models.py). After a removal
at the start, middle or end: per-layer config fields and ``layer_idx`` follow the kept layers, generation with
the KV cache gives the same logits as without it, and the reloaded model (plain ``from_pretrained`` where the
record says it is exact, ``AutoCollapsedModel`` always) generates the same.
"""

import pytest
import torch

import hf_collapse
from tiny_models import CASES_BY_NAME, plain_exact

DECODERS = ["llama", "qwen2", "mistral", "qwen3", "mistral_sliding", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox",
            "smollm3", "granite", "qwen2_moe"]
PAIRS = [(name, removal) for name in DECODERS for removal in CASES_BY_NAME[name].removals]
IDS = [f"{name}-{'+'.join(removal)}" for name, removal in PAIRS]
PROMPT = torch.tensor([[5, 17, 42, 8, 23, 61]])


def _generate(model, use_cache):
    out = model.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def _layers(model):
    adapter = hf_collapse.adapter_for(model)
    return adapter.layers(adapter.backbone(model))


def _layer_settings(layer):
    """The per-layer settings a layer was built with (sliding window, rope on/off, MoE or dense MLP, ...)."""
    return [(type(m).__name__, {k: v for k, v in vars(m).items() if k in (
        "sliding_window", "is_sliding", "layer_type", "use_rope", "attention_type", "scaling")})
        for m in layer.modules()]


@pytest.mark.parametrize("case_name,removal", PAIRS, ids=IDS)
def test_removal_keeps_per_layer_settings_and_kv_cache(case_name, removal, tmp_path):
    case = CASES_BY_NAME[case_name]
    model = case.build()
    assert hf_collapse.adapter_for(model).family == "decoder"
    config = model.config
    n = config.num_hidden_layers
    kept = [i for i in range(n) if f"layers.{i}" not in removal]
    per_layer = {k: list(v) for k, v in vars(config).items()
                 if isinstance(v, (list, tuple)) and len(v) == n and k not in ("architectures", "eos_token_id")}
    before = [_layer_settings(layer) for layer in _layers(model)]

    collapsed = hf_collapse.remove_blocks(model, removal)

    new = collapsed.config
    assert new.num_hidden_layers == len(kept) == len(_layers(collapsed))
    for key, values in per_layer.items():  # layer_types, no_rope_layers, ...
        assert list(getattr(new, key)) == [values[i] for i in kept], key
    assert [_layer_settings(layer) for layer in _layers(collapsed)] == [before[i] for i in kept]
    for position, layer in enumerate(_layers(collapsed)):
        indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert indices == {position}

    sequences, logits = _generate(collapsed, use_cache=True)
    uncached_sequences, uncached_logits = _generate(collapsed, use_cache=False)
    assert torch.equal(sequences, uncached_sequences)
    torch.testing.assert_close(logits, uncached_logits, atol=1e-4, rtol=0)

    record = hf_collapse.collapse_record(collapsed)
    assert record["plain_reload_exact"] == plain_exact(case, removal)
    collapsed.save_pretrained(tmp_path)
    reloads = [hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)]
    if record["plain_reload_exact"]:
        reloads.append(type(collapsed).from_pretrained(tmp_path))
    for reloaded in reloads:
        for use_cache in (True, False):
            reloaded_sequences, reloaded_logits = _generate(reloaded.eval(), use_cache)
            assert torch.equal(reloaded_sequences, sequences)
            torch.testing.assert_close(reloaded_logits, logits, atol=1e-4, rtol=0)


def test_a_pattern_the_config_cannot_express_is_recorded_as_such(tmp_path):
    """Qwen2-MoE picks a dense or an expert MLP from each layer's index: removing one layer moves the later ones
    onto the other kind, which no config field can express. The record says so, and it is true."""
    case = CASES_BY_NAME["qwen2_moe"]
    collapsed = hf_collapse.remove_blocks(case.build(), ["layers.1"])
    assert hf_collapse.collapse_record(collapsed)["plain_reload_exact"] is False
    collapsed.save_pretrained(tmp_path)
    plain, info = type(collapsed).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]  # the layers were rebuilt as the other MLP kind
    exact = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(exact(**inputs).logits, collapsed(**inputs).logits, atol=1e-5, rtol=0)


def test_structure_not_model_type_decides():
    """A decoder is recognised whatever its model_type says; an encoder with an unknown type is still refused."""
    model = CASES_BY_NAME["olmo2"].build()
    model.config.model_type = "some_future_decoder"
    assert hf_collapse.adapter_for(model).family == "decoder"
    from transformers import DistilBertConfig, DistilBertModel
    encoder = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32))
    with pytest.raises(ValueError, match="does not know"):
        hf_collapse.adapter_for(encoder)


def test_task_heads_and_bare_backbones_are_decoders():
    from transformers import Gemma3TextModel, Qwen3ForSequenceClassification
    gemma = CASES_BY_NAME["gemma3"].build()
    bare = Gemma3TextModel(gemma.config)
    assert [b.name for b in hf_collapse.find_blocks(bare)] == [f"layers.{i}" for i in range(5)]
    classifier = Qwen3ForSequenceClassification(CASES_BY_NAME["qwen3"].build().config)
    smaller = hf_collapse.remove_blocks(classifier, ["model.layers.2"])
    assert smaller.config.num_hidden_layers == 4 and len(smaller.config.layer_types) == 4

"""The generic decoder adapter: any decoder-only causal LM, recognised by structure.

Each family is a tiny random-init model of the real transformers class (tests/tiny_models.py). After a removal
at the start, middle or end: per-layer config fields and ``layer_idx`` follow the kept layers, generation with
the KV cache gives the same logits as without it, and the reloaded model (plain ``from_pretrained`` where the
record says it is exact, ``AutoCollapsedModel`` always) generates the same.
"""

import pytest
import torch
from tiny_models import CASES_BY_NAME, plain_exact

import hf_collapse

DECODERS = [
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "mistral_sliding",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "gpt_neox",
    "smollm3",
    "granite",
    "qwen2_moe",
]
PAIRS = [(name, removal) for name in DECODERS for removal in CASES_BY_NAME[name].removals]
IDS = [f"{name}-{'+'.join(removal)}" for name, removal in PAIRS]
PROMPT = torch.tensor([[5, 17, 42, 8, 23, 61]])


def _generate(model, use_cache):
    out = model.generate(
        PROMPT,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        use_cache=use_cache,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits)


def _layers(model):
    adapter = hf_collapse.adapter_for(model)
    return adapter.layers(adapter.backbone(model))


def _layer_settings(layer):
    """The per-layer settings a layer was built with (sliding window, rope on/off, MoE or dense MLP, ...)."""
    return [
        (
            type(m).__name__,
            {
                k: v
                for k, v in vars(m).items()
                if k in ("sliding_window", "is_sliding", "layer_type", "use_rope", "attention_type", "scaling")
            },
        )
        for m in layer.modules()
    ]


@pytest.mark.parametrize("case_name,removal", PAIRS, ids=IDS)
def test_removal_keeps_per_layer_settings_and_kv_cache(case_name, removal, tmp_path):
    case = CASES_BY_NAME[case_name]
    model = case.build()
    assert hf_collapse.adapter_for(model).family == "decoder"
    config = model.config
    n = config.num_hidden_layers
    kept = [i for i in range(n) if f"layers.{i}" not in removal]
    per_layer = {
        k: list(v)
        for k, v in vars(config).items()
        if isinstance(v, (list, tuple)) and len(v) == n and k not in ("architectures", "eos_token_id")
    }
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
    """Ernie-4.5-MoE picks a dense or an expert MLP from each layer's index parity (moe_layer_interval), with no
    config field that lists the layers: removing one layer moves the later ones onto the other kind. The record says
    so, and it is true; AutoCollapsedModel still rebuilds the model exactly."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(0)
    model = Ernie4_5_MoeForCausalLM(
        Ernie4_5_MoeConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_num_experts=4,
            moe_k=2,
            moe_layer_interval=2,
            moe_layer_start_index=0,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    ).eval()
    collapsed = hf_collapse.remove_blocks(model, ["model.layers.1"])
    assert hf_collapse.collapse_record(collapsed)["plain_reload_exact"] is False
    collapsed.save_pretrained(tmp_path)
    plain, info = type(collapsed).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]  # the layers were rebuilt as the other MLP kind
    exact = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    inputs = CASES_BY_NAME["llama"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(exact(**inputs).logits, collapsed(**inputs).logits, atol=1e-5, rtol=0)


def test_layer_patterns_the_config_can_spell_are_remapped(tmp_path):
    """Config fields that list or count layers follow a removal, so that plain from_pretrained rebuilds the collapsed
    model: Qwen2-MoE's sparse step becomes an explicit mlp_only_layers, DeepSeek-V3's dense prefix
    (first_k_dense_replace) shrinks, Llama4's moe_layers are renumbered."""
    expected = {
        "qwen2_moe": ("layers.1", {"decoder_sparse_step": 1, "mlp_only_layers": [0, 1, 3]}),
        "deepseek_v3": ("layers.0", {"first_k_dense_replace": 1}),
        "llama4": ("layers.0", {"moe_layers": [0, 2]}),
    }
    for name, (removed, fields) in expected.items():
        case = CASES_BY_NAME[name]
        collapsed = hf_collapse.remove_blocks(case.build(), [removed])
        assert hf_collapse.collapse_record(collapsed)["plain_reload_exact"] is True, name
        for key, value in fields.items():
            assert getattr(collapsed.config, key) == value, (name, key)
        collapsed.save_pretrained(tmp_path / name)
        plain, info = type(collapsed).from_pretrained(tmp_path / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], name
        with torch.no_grad():
            torch.testing.assert_close(
                plain.eval()(**case.inputs()).logits, collapsed(**case.inputs()).logits, atol=1e-5, rtol=0
            )


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

"""Removing blocks, saving and reloading: every family, removals at the start, middle and end.

Reference: the collapsed model's own outputs before saving, and plain transformers / diffusers
``from_pretrained`` (code we did not write) wherever the config can express the change.
"""

import copy

import pytest
import torch
from tiny_models import CASES, CASES_BY_NAME, output_of, plain_exact

import hf_collapse

PAIRS = [(case.name, removal) for case in CASES for removal in case.removals]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case_name,removal", PAIRS, ids=[f"{c}-{'+'.join(r)}" for c, r in PAIRS])
def test_remove_save_reload_exact(case_name, removal, tmp_path):
    case = CASES_BY_NAME[case_name]
    model = case.build()
    inputs = case.inputs()
    original_out = output_of(model, inputs)
    original_state = _state(model)
    original_config = copy.deepcopy(model.config)
    n_blocks = len(hf_collapse.find_blocks(model))

    collapsed = hf_collapse.remove_blocks(model, removal)

    # The input model is untouched.
    assert collapsed is not model
    assert len(hf_collapse.find_blocks(model)) == n_blocks
    assert all(torch.equal(v, original_state[k]) for k, v in model.state_dict().items())
    assert (
        dict(model.config) == dict(original_config)
        if isinstance(model.config, dict)
        else model.config.to_dict() == original_config.to_dict()
    )
    assert torch.equal(output_of(model, inputs), original_out)

    # The collapsed model lost exactly those blocks and records the edit.
    assert len(hf_collapse.find_blocks(collapsed)) == n_blocks - len(removal)
    record = hf_collapse.collapse_record(collapsed)
    assert record["edits"] == [{"op": "remove_blocks", "blocks": removal}]
    assert record["plain_reload_exact"] == plain_exact(case, removal)
    expected = output_of(collapsed, inputs)

    collapsed.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    assert type(reloaded) is type(collapsed)
    torch.testing.assert_close(output_of(reloaded, inputs), expected, atol=1e-5, rtol=0)
    assert hf_collapse.collapse_record(reloaded) == record

    if plain_exact(case, removal):
        plain, info = type(collapsed).from_pretrained(tmp_path, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if k in info), info
        torch.testing.assert_close(output_of(plain.eval(), inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama", "vit", "resnet_basic", "mobilenet_v2", "dit", "swin"])
def test_removed_block_acts_as_identity(case_name):
    """Removing a residual block gives the same function as making that block return its input."""
    case = CASES_BY_NAME[case_name]
    model = case.build()
    inputs = case.inputs()
    block = next(b for b in hf_collapse.find_blocks(model)[1:] if b.removable)

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.get_submodule(block.path).register_forward_hook(identity, with_kwargs=True)
    skipped = output_of(model, inputs)
    handle.remove()
    collapsed = hf_collapse.remove_blocks(model, [block])
    torch.testing.assert_close(output_of(collapsed, inputs), skipped, atol=1e-5, rtol=0)


def test_successive_removals_replay_in_order(tmp_path):
    """Two remove_blocks calls (names renumbered in between) reload exactly, including a Swin shift flip."""
    case = CASES_BY_NAME["swin"]
    model = case.build()
    inputs = case.inputs()
    once = hf_collapse.remove_blocks(model, ["encoder.layers.0.blocks.3"])
    twice = hf_collapse.remove_blocks(once, ["encoder.layers.0.blocks.0"])
    record = hf_collapse.collapse_record(twice)
    assert [e["blocks"] for e in record["edits"]] == [["encoder.layers.0.blocks.3"], ["encoder.layers.0.blocks.0"]]
    assert record["base_values"] == {"depths": [4, 3]}
    assert twice.config.depths == [2, 3]
    assert record["plain_reload_exact"] is False  # blocks 1, 2 remain: the shift pattern flipped
    twice.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    torch.testing.assert_close(output_of(reloaded, inputs), output_of(twice, inputs), atol=1e-5, rtol=0)


def test_inplace_edits_the_given_model():
    model = CASES_BY_NAME["bert"].build()
    result = hf_collapse.remove_blocks(model, ["encoder.layer.1"], inplace=True)
    assert result is model
    assert model.config.num_hidden_layers == 4
    assert len(model.bert.encoder.layer) == 4


def test_bf16_model_reloads_in_bf16(tmp_path):
    case = CASES_BY_NAME["llama"]
    model = case.build().to(torch.bfloat16)
    collapsed = hf_collapse.remove_blocks(model, ["layers.1"])
    collapsed.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    # transformers keeps some buffers (rotary frequencies) in float32 on load: compare with its own loader.
    plain = type(collapsed).from_pretrained(tmp_path).eval()
    assert plain.dtype == torch.bfloat16
    inputs = case.inputs()
    assert torch.equal(output_of(reloaded, inputs), output_of(plain, inputs))


def test_folder_without_record_loads_plainly(tmp_path):
    case = CASES_BY_NAME["roberta"]
    model = case.build()
    model.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    assert hf_collapse.collapse_record(reloaded) is None
    inputs = case.inputs()
    torch.testing.assert_close(output_of(reloaded, inputs), output_of(model, inputs), atol=1e-6, rtol=0)


# Loading options: AutoCollapsedModel passes them through for transformers and diffusers models alike.
# Reference: the library's own from_pretrained with the same option, on the same folder (plain-exact removals), and
# the collapsed model itself cast the same way.
DTYPE_CASES = [
    ("bert", ["encoder.layer.2"]),
    ("mobilenet_v2", ["layer.3"]),
    ("dit", ["transformer_blocks.2"]),
    ("unet", None),
]


def _tensors(model):
    return dict(list(model.named_parameters()) + list(model.named_buffers()))


@pytest.mark.parametrize("option", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case_name,removal", DTYPE_CASES, ids=[c for c, _ in DTYPE_CASES])
def test_dtype_option_is_honoured(case_name, removal, dtype, option, tmp_path):
    case = CASES_BY_NAME[case_name]
    collapsed = hf_collapse.remove_blocks(case.build(), removal or case.removals[0])
    collapsed.save_pretrained(tmp_path)

    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path, **{option: dtype})

    assert reloaded.dtype == dtype
    if plain_exact(case, removal or case.removals[0]):
        # The library's own loader decides which tensors stay in float32 (buffers, _keep_in_fp32_modules).
        plain = type(collapsed).from_pretrained(tmp_path, **{option: dtype})
        assert {k: v.dtype for k, v in _tensors(reloaded).items()} == {k: v.dtype for k, v in _tensors(plain).items()}
    expected = {k: v.detach().to(_tensors(reloaded)[k].dtype) for k, v in _tensors(collapsed).items()}
    assert all(torch.equal(v.detach(), expected[k]) for k, v in _tensors(reloaded).items())
    # float32 again: the weights are the collapsed model's, rounded to dtype.
    torch.testing.assert_close(
        output_of(reloaded.float(), case.inputs()), output_of(collapsed, case.inputs()), atol=0.1, rtol=0.05
    )


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto"], ids=["cpu", "dict", "auto"])
@pytest.mark.parametrize(
    "case_name,removal",
    [("bert", ["encoder.layer.2"]), ("mobilenet_v2", ["layer.3"]), ("dit", ["transformer_blocks.2"])],
    ids=["bert", "mobilenet_v2", "dit"],
)
def test_device_map_option_is_honoured(case_name, removal, device_map, tmp_path):
    case = CASES_BY_NAME[case_name]
    collapsed = hf_collapse.remove_blocks(case.build(), removal)
    collapsed.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path, device_map=device_map)
    assert {t.device.type for t in _tensors(reloaded).values()} == {"cpu"}
    torch.testing.assert_close(
        output_of(reloaded, case.inputs()), output_of(collapsed, case.inputs()), atol=1e-5, rtol=0
    )


def test_tlc_edits_replay_under_device_map_and_dtype(tmp_path):
    """transformers builds the model on the meta device under device_map: the TLC replay must work there too."""
    from hf_collapse.tlc import activation_statistics, linearize

    case = CASES_BY_NAME["bert"]
    model = case.build()
    stats = activation_statistics(model, [case.inputs()])
    collapsed = linearize(model, next(s for name, s in stats.items() if ".1." in name))
    collapsed.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16)
    assert reloaded.dtype == torch.bfloat16
    assert {t.device.type for t in _tensors(reloaded).values()} == {"cpu"}
    torch.testing.assert_close(
        output_of(reloaded.float(), case.inputs()), output_of(collapsed, case.inputs()), atol=0.1, rtol=0.05
    )


@pytest.mark.parametrize(
    "case_name,removal", [("bert", ["encoder.layer.2"]), ("dit", ["transformer_blocks.2"])], ids=["bert", "dit"]
)
def test_subfolder_option_with_dtype(case_name, removal, tmp_path):
    case = CASES_BY_NAME[case_name]
    collapsed = hf_collapse.remove_blocks(case.build(), removal)
    collapsed.save_pretrained(tmp_path / "component")
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(
        tmp_path, subfolder="component", torch_dtype=torch.float16
    )
    assert reloaded.dtype == torch.float16
    assert len(hf_collapse.find_blocks(reloaded)) == len(hf_collapse.find_blocks(collapsed))


def test_diffusers_variant_picks_its_weights_and_unknown_options_are_refused(tmp_path):
    case = CASES_BY_NAME["dit"]
    collapsed = hf_collapse.remove_blocks(case.build(), ["transformer_blocks.2"])
    collapsed.save_pretrained(tmp_path)
    half = hf_collapse.remove_blocks(case.build(), ["transformer_blocks.2"])
    with torch.no_grad():
        for p in half.parameters():
            p.mul_(0.5)
    half.to(torch.float16).save_pretrained(tmp_path, variant="fp16")

    default = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    variant = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path, variant="fp16")
    # Without a dtype the saved weights' dtype is kept (transformers' "auto"); diffusers' own default is float32.
    plain_variant = type(collapsed).from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert default.dtype == torch.float32 and variant.dtype == plain_variant.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), collapsed.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(variant.state_dict().values(), plain_variant.state_dict().values()))
    with pytest.raises(TypeError, match="offload_folder"):
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path, offload_folder=str(tmp_path / "offload"))


def test_a_record_of_the_former_llama_family_still_loads(tmp_path):
    """hf_collapse 0.1 recorded Llama/Qwen2/Mistral removals under the family name 'llama' (now 'decoder')."""
    import json

    case = CASES_BY_NAME["llama"]
    collapsed = hf_collapse.remove_blocks(case.build(), ["model.layers.1"])
    collapsed.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hf_collapse"]["family"] == "decoder"
    config["hf_collapse"]["family"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, collapsed.eval()(**inputs).logits, atol=1e-5, rtol=0)

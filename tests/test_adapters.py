"""Adapters: finding the family through task heads and wrappers, blocks, activation sites, user families."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import CASES, CASES_BY_NAME, output_of
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaModel,
    RobertaModel,
    SwinModel,
)

import hf_collapse
from hf_collapse.architectures.common import LayerListAdapter

FAMILIES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm_roberta": "bert",
    "vit": "vit",
    "swin": "swin",
    "resnet_basic": "resnet",
    "resnet_bottleneck": "resnet",
    "mobilenet_v2": "mobilenet_v2",
    "gpt2": "gpt2",
    "gpt2_scaled": "gpt2",
    "dit": "dit",
    "transformer2d": "dit",
    "unet": "unet_2d_condition",
}
DECODERS = (
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
    "mixtral",
    "deepseek_v3",
    "llama4",
)
FAMILIES.update({name: "decoder" for name in DECODERS})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_family_blocks_and_paths(case):
    model = case.build()
    assert hf_collapse.adapter_for(model).family == FAMILIES[case.name]
    blocks = hf_collapse.find_blocks(model)
    assert blocks and any(b.removable for b in blocks)
    for block in blocks:
        for path in (block.path, block.input_path, block.output_path, *block.extra_paths):
            model.get_submodule(path)  # raises if the path is wrong
        assert block.params == sum(
            p.numel() for path in (block.path, *block.extra_paths) for p in model.get_submodule(path).parameters()
        )
        assert block.removable == (block.reason == "")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_activation_sites_connect_real_layers(case):
    model = case.build()
    sites = hf_collapse.adapter_for(model).activation_sites(hf_collapse.adapter_for(model).backbone(model))
    assert sites or case.name == "mixtral"  # every MLP of a Mixtral is a mixture of experts: nothing to linearize
    backbone = hf_collapse.adapter_for(model).backbone(model)
    block_names = {b.name for b in hf_collapse.adapter_for(model).blocks(backbone)}
    for site in sites:
        producer = backbone.get_submodule(site.producer)
        consumer = backbone.get_submodule(site.consumer)
        backbone.get_submodule(site.activation)
        assert site.block in block_names or (case.name == "unet" and not site.name.startswith("down_blocks"))
        if site.kind == "conv":
            width_out, width_in = producer.out_channels, consumer.in_channels
            assert isinstance(backbone.get_submodule(site.norm), torch.nn.BatchNorm2d)
        elif site.kind == "conv1d":  # GPT-2's Conv1D stores (in, out)
            width_out, width_in = producer.weight.shape[1], consumer.weight.shape[0]
        else:
            width_out, width_in = producer.out_features, consumer.in_features
        assert width_out == (2 * width_in if site.gated and case.name in ("unet", "phi3") else width_in)
    if case.name in DECODERS and case.name != "gpt_neox" or case.name == "unet":
        assert all(site.gated for site in sites)  # SwiGLU / GEGLU
    if case.name in ("bert", "vit", "swin", "dit", "resnet_basic", "mobilenet_v2", "gpt2", "gpt_neox"):
        assert not any(site.gated for site in sites)


@pytest.mark.parametrize(
    "model_cls,case_name,prefix",
    [
        (RobertaModel, "roberta", "roberta."),
        (SwinModel, "swin", "swin."),
        (LlamaModel, "llama", "model."),
    ],
)
def test_task_head_and_bare_backbone_share_block_names(model_cls, case_name, prefix):
    """Names are paths in the model passed; the backbone-relative spelling (local_name) is shared and accepted."""
    head = CASES_BY_NAME[case_name].build()
    bare = model_cls(head.config)
    head_blocks = hf_collapse.find_blocks(head)
    bare_blocks = hf_collapse.find_blocks(bare)
    assert [b.local_name for b in head_blocks] == [b.local_name for b in bare_blocks] == [b.name for b in bare_blocks]
    assert all(h.path == h.name == prefix + b.path for h, b in zip(head_blocks, bare_blocks))
    assert all(h.aliases == (b.name,) for h, b in zip(head_blocks, bare_blocks))
    removable = [b for b in head_blocks if b.removable][0]
    smaller = hf_collapse.remove_blocks(head, [removable.local_name])  # the old spelling still names it
    assert len(hf_collapse.find_blocks(smaller)) == len(head_blocks) - 1


def test_through_a_peft_wrapper():
    case = CASES_BY_NAME["bert"]
    model = case.build()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))
    assert hf_collapse.adapter_for(peft_model).family == "bert"
    blocks = hf_collapse.find_blocks(peft_model)
    assert blocks[2].path == "base_model.model.bert.encoder.layer.2"
    assert peft_model.get_submodule(blocks[2].path) is model.bert.encoder.layer[2]
    collapsed = hf_collapse.remove_blocks(peft_model, [blocks[2]])
    assert len(hf_collapse.find_blocks(collapsed)) == 4
    assert len(model.bert.encoder.layer) == 5  # the wrapped model is untouched
    output_of(collapsed, case.inputs())


class DistilBertAdapter(LayerListAdapter):
    family = "distilbert-test"
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    depth_key = "n_layers"


def test_register_a_new_family(tmp_path):
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=32, num_labels=2)
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(config).eval()
    hf_collapse.register_architecture(DistilBertAdapter())
    try:
        assert "distilbert-test" in hf_collapse.supported_families()
        collapsed = hf_collapse.remove_blocks(model, ["transformer.layer.1"])
        assert collapsed.config.n_layers == 2
        collapsed.save_pretrained(tmp_path)
        inputs = {"input_ids": torch.tensor([[1, 5, 9, 2]])}
        plain = DistilBertForSequenceClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(output_of(plain, inputs), output_of(collapsed, inputs), atol=1e-5, rtol=0)
    finally:
        hf_collapse.unregister_architecture("distilbert-test")
    with pytest.raises(ValueError, match="does not know"):
        hf_collapse.adapter_for(model)


@pytest.mark.parametrize("case_name", ["gpt2", "llama", "qwen2"])
def test_decoder_generates_with_kv_cache_after_removal_and_reload(case_name, tmp_path):
    case = CASES_BY_NAME[case_name]
    model = case.build()
    collapsed = hf_collapse.remove_blocks(model, [hf_collapse.find_blocks(model)[1]])
    attention_idx = [m.layer_idx for m in collapsed.modules() if type(m).__name__.endswith("Attention")]
    assert attention_idx == list(range(len(attention_idx)))
    if getattr(collapsed.config, "layer_types", None) is not None:
        assert len(collapsed.config.layer_types) == collapsed.config.num_hidden_layers
    prompt = torch.tensor([[5, 17, 42, 8]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = collapsed.generate(prompt, use_cache=True, **settings)
    uncached = collapsed.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    collapsed.save_pretrained(tmp_path)
    for reloaded in (
        hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path),
        type(collapsed).from_pretrained(tmp_path),
    ):
        assert torch.equal(reloaded.generate(prompt, use_cache=True, **settings), cached)

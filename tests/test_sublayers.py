"""Sub-layer granularity: removing a decoder layer's self-attention or MLP on its own (FinerCut / BlockPruner).

Each family is a tiny random-init model of the real transformers class. A removed sub-layer must compute exactly
what the same model computes with that branch's output projection zeroed (the branch becomes ``x + 0``), its
parameters must be gone, the edit must be recorded and replayed by ``AutoCollapsedModel``, and generation with the
KV cache must agree with generation without it.
"""

import pytest
import torch
from tiny_models import CASES_BY_NAME

import hf_collapse
from hf_collapse import metrics
from hf_collapse.architectures.sublayers import ZeroAttention, ZeroMLP
from hf_collapse.block_io import BlockIO

FAMILIES = ["llama", "qwen2", "gemma2", "gpt_neox", "gpt2"]
# The linear that ends each branch, relative to the layer: zeroing it (weight and bias) makes the branch output 0.
BRANCH_END = {
    "attention": {"gpt_neox": "attention.dense", "gpt2": "attn.c_proj"},
    "mlp": {"gpt_neox": "mlp.dense_4h_to_h", "gpt2": "mlp.c_proj"},
}
DEFAULT_END = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}
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


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _layers(model):
    adapter = hf_collapse.adapter_for(model)
    return adapter.layers(adapter.backbone(model))


def _zeroed_reference(model, family, kind, index):
    """The uncollapsed model with the branch's last linear zeroed: what removing the sub-layer must compute."""
    reference = CASES_BY_NAME[family].build()
    reference.load_state_dict(model.state_dict())
    end = _layers(reference)[index].get_submodule(BRANCH_END[kind].get(family, DEFAULT_END[kind]))
    with torch.no_grad():
        end.weight.zero_()
        if end.bias is not None:
            end.bias.zero_()
    return reference


@pytest.mark.parametrize("kind", ["attention", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_sublayer_is_the_zeroed_branch_and_reloads_exactly(family, kind, tmp_path):
    case = CASES_BY_NAME[family]
    model = case.build()
    inputs = case.inputs()
    before = _logits(model, inputs)
    units = hf_collapse.find_blocks(model, granularity=kind)
    n = model.config.num_hidden_layers
    assert len(units) == n and all(u.kind == kind and u.removable for u in units)
    blocks = hf_collapse.find_blocks(model)
    assert [u.name.rsplit(".", 1)[0] for u in units] == [b.name for b in blocks]

    for index in (0, n - 1):  # the first layer's cache slot is the one transformers reads positions from
        unit = units[index]
        collapsed = hf_collapse.remove_blocks(model, [unit])
        torch.testing.assert_close(_logits(model, inputs), before, atol=0, rtol=0)  # the input is untouched

        # the parameters are gone: the sub-layer and the norms that only served it
        removed_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in collapsed.parameters())
        assert removed_params == unit.params > 0
        layer = _layers(collapsed)[index]
        branch = layer.get_submodule(unit.local_name.rsplit(".", 1)[1])
        assert isinstance(branch, ZeroAttention if kind == "attention" else ZeroMLP)
        gone = [k for k in model.state_dict() if k not in collapsed.state_dict()]
        assert gone and all(
            k.startswith(unit.name + ".") or any(k.startswith(p + ".") for p in unit.extra_paths) for k in gone
        )
        assert len(hf_collapse.find_blocks(collapsed, granularity=kind)) == n - 1
        assert len(hf_collapse.find_blocks(collapsed)) == n  # no block was removed

        # the function: the same model with the branch's output projection zeroed
        expected = _logits(_zeroed_reference(model, family, kind, index), inputs)
        got = _logits(collapsed, inputs)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(got, before, atol=1e-3)

        # the KV cache: an attention-less layer keeps its slot in step
        sequences, logits = _generate(collapsed, use_cache=True)
        uncached_sequences, uncached_logits = _generate(collapsed, use_cache=False)
        assert torch.equal(sequences, uncached_sequences)
        torch.testing.assert_close(logits, uncached_logits, atol=1e-4, rtol=0)

        # the record: backbone-relative names, not expressible by a config
        record = hf_collapse.collapse_record(collapsed)
        assert record["edits"] == [{"op": "remove_sublayers", "units": [unit.local_name]}]
        assert record["plain_reload_exact"] is False
        folder = tmp_path / f"{index}"
        collapsed.save_pretrained(folder)
        reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(folder)
        assert set(reloaded.state_dict()) == set(collapsed.state_dict())
        torch.testing.assert_close(_logits(reloaded, inputs), got, atol=1e-5, rtol=0)
        reloaded_sequences, _ = _generate(reloaded, use_cache=True)
        assert torch.equal(reloaded_sequences, sequences)


def test_a_removed_first_attention_keeps_the_cache_length():
    """transformers computes positions from the cache length of layer 0: it must count the prompt."""
    model = CASES_BY_NAME["llama"].build()
    collapsed = hf_collapse.remove_blocks(model, ["model.layers.0.self_attn"])
    with torch.no_grad():
        out = collapsed(PROMPT, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.get_seq_length(0) == PROMPT.shape[1]
    assert cache.get_seq_length(1) == PROMPT.shape[1]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sublayers_mixed_with_block_removals_replay_in_order(family, tmp_path):
    case = CASES_BY_NAME[family]
    model = case.build()
    inputs = case.inputs()
    prefix = hf_collapse.find_blocks(model)[0].name.rsplit(".", 1)[0]  # "model.layers"
    step1 = hf_collapse.remove_blocks(model, [f"{prefix}.1.self_attn", f"{prefix}.3.mlp"])
    step2 = hf_collapse.remove_blocks(step1, [f"{prefix}.0"])  # layer 1 (no attention) moves to position 0
    step3 = hf_collapse.remove_blocks(step2, [f"{prefix}.3.self_attn"])  # the former layer 4
    layers = _layers(step3)
    assert isinstance(layers[0].self_attn, ZeroAttention) and layers[0].self_attn.layer_idx == 0
    assert isinstance(layers[2].mlp, ZeroMLP) and isinstance(layers[3].self_attn, ZeroAttention)
    assert [b.name for b in hf_collapse.find_blocks(step3, "attention")] == [
        f"{prefix}.1.self_attn",
        f"{prefix}.2.self_attn",
    ]
    record = hf_collapse.collapse_record(step3)
    assert [e["op"] for e in record["edits"]] == ["remove_sublayers", "remove_blocks", "remove_sublayers"]
    sequences, logits = _generate(step3, use_cache=True)
    uncached_sequences, uncached_logits = _generate(step3, use_cache=False)
    assert torch.equal(sequences, uncached_sequences)
    torch.testing.assert_close(logits, uncached_logits, atol=1e-4, rtol=0)
    step3.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(step3, inputs), atol=1e-5, rtol=0)


def test_sublayer_refusals():
    model = CASES_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match=r"remove_blocks\(model, \['model.layers.2'\]\)"):
        hf_collapse.remove_blocks(model, ["model.layers.2.self_attn", "model.layers.2.mlp"])
    without_attention = hf_collapse.remove_blocks(model, ["model.layers.2.self_attn"])
    (mlp,) = [u for u in hf_collapse.find_blocks(without_attention, "mlp") if u.index == 2]
    assert not mlp.removable
    with pytest.raises(ValueError, match="remove the whole block 'layers.2' instead"):
        hf_collapse.remove_blocks(without_attention, ["model.layers.2.mlp"])
    with pytest.raises(ValueError, match="unknown block 'model.layers.2.self_attn'"):  # removed already
        hf_collapse.remove_blocks(without_attention, ["model.layers.2.self_attn"])
    with pytest.raises(ValueError, match="separate remove_blocks calls"):
        hf_collapse.remove_blocks(model, ["model.layers.1", "model.layers.2.mlp"])
    with pytest.raises(ValueError, match="unknown block 'model.layers.9.mlp'"):
        hf_collapse.remove_blocks(model, ["model.layers.9.mlp"])
    with pytest.raises(ValueError, match="supported: block, attention, mlp"):
        hf_collapse.find_blocks(model, granularity="heads")
    with pytest.raises(ValueError, match="granularity 'attention' is not supported for family 'bert'"):
        hf_collapse.find_blocks(CASES_BY_NAME["bert"].build(), granularity="attention")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_sublayer_io_is_the_residual_stream_around_each_branch(family):
    """A sub-layer's input is the residual stream entering its branch; its output, that stream plus the branch."""
    case = CASES_BY_NAME[family]
    model = case.build()
    inputs = {"input_ids": case.inputs()["input_ids"]}  # no padding: nothing is zeroed
    attention = hf_collapse.find_blocks(model, "attention")
    mlp = hf_collapse.find_blocks(model, "mlp")
    io = BlockIO(model, attention + mlp, detach=True)
    with torch.no_grad(), io.capturing():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    try:
        for i in range(model.config.num_hidden_layers - 1):  # the last hidden state has the final norm applied
            x_attn, y_attn = io.raw(attention[i].name)
            x_mlp, y_mlp = io.raw(mlp[i].name)
            torch.testing.assert_close(x_attn, hidden[i], atol=1e-6, rtol=0)
            if model.config.model_type == "gpt_neox" and model.config.use_parallel_residual:
                torch.testing.assert_close(x_mlp, hidden[i], atol=1e-6, rtol=0)  # both branches read x
                torch.testing.assert_close(y_attn + y_mlp - hidden[i], hidden[i + 1], atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(x_mlp, y_attn, atol=1e-6, rtol=0)
                torch.testing.assert_close(y_mlp, hidden[i + 1], atol=1e-5, rtol=0)
    finally:
        io.remove()


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_score_blocks_and_collapse_on_sublayers(kind, tmp_path):
    case = CASES_BY_NAME["qwen2"]
    model = case.build()
    loader = [case.inputs() for _ in range(2)]
    units = hf_collapse.find_blocks(model, kind)
    # a branch whose output projection is zero leaves the stream unchanged: it scores 0 and goes first
    end = _layers(model)[2].get_submodule(DEFAULT_END[kind])
    with torch.no_grad():
        end.weight.zero_()
    scores = hf_collapse.score_blocks(model, loader, method="block_influence", granularity=kind, progress=False)
    assert list(scores) == [u.name for u in units]
    assert scores[units[2].name] == pytest.approx(0.0, abs=1e-6)
    assert all(scores[u.name] > 1e-4 for i, u in enumerate(units) if i != 2)
    msw = hf_collapse.score_blocks(model, loader, method="msw", granularity=kind, progress=False)
    assert min(msw, key=msw.get) == units[2].name

    inputs = metrics.example_inputs(model, batch_size=1, seq_len=8)
    collapsed, report = hf_collapse.collapse(
        model, scores, num_units=2, granularity=kind, example_inputs=inputs, latency_repeats=0, progress=False
    )
    order = sorted(scores, key=scores.get)[:2]
    assert [s.unit for s in report.steps[1:]] == order
    assert hf_collapse.collapse_record(collapsed)["edits"] == [
        {"op": "remove_sublayers", "units": [name.removeprefix("model.")]} for name in order
    ]
    assert report.after.params == metrics.count_parameters(collapsed)
    assert report.after.flops == metrics.forward_flops(collapsed, inputs)
    with pytest.raises(ValueError, match="unknown block"):  # sub-layer scores need their granularity
        hf_collapse.collapse(model, scores, num_units=1, latency_repeats=0, progress=False)
    collapsed.save_pretrained(tmp_path)
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path)
    inputs = case.inputs()
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(collapsed, inputs), atol=1e-5, rtol=0)

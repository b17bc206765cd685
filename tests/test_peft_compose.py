"""Collapsing a LoRA-wrapped model (peft ``get_peft_model``) with remove_blocks, collapse and TLC.

The chosen behaviour: the collapsed peft model runs and trains as usual, but saving it refuses (an adapter file
cannot carry the collapse) and says to ``merge_and_unload()`` first; the merged model is a plain collapsed model
with its record that saves and reloads exactly. Real peft LoRA throughout, with non-zero LoRA weights so that a
lost adapter would show in the outputs.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import CASES_BY_NAME, output_of

import hf_collapse
from hf_collapse.hub import loading_code, save_with_card

LORA = {
    "bert": dict(task_type="SEQ_CLS", target_modules=["query", "value"]),
    "llama": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]),
}


def _lora(case_name):
    case = CASES_BY_NAME[case_name]
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter changes the function (a lost adapter would show).
    model = get_peft_model(case.build(), LoraConfig(r=4, init_lora_weights=False, **LORA[case_name])).eval()
    return case, model


def _refuses_to_save(collapsed, tmp_path):
    """Every way of saving the collapsed peft model refuses, names merge_and_unload, and writes nothing."""
    for save in (
        lambda: collapsed.save_pretrained(tmp_path / "adapter"),
        lambda: collapsed.push_to_hub("me/collapsed-lora"),
        lambda: save_with_card(collapsed, tmp_path / "card"),
        lambda: loading_code(collapsed, "me/collapsed-lora"),
    ):
        with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
            save()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "card").exists()


def _merged_reloads_exactly(collapsed, inputs, tmp_path, plain_exact):
    """merge_and_unload gives a plain collapsed model, record intact, that reloads exactly (both ways + card)."""
    expected = output_of(collapsed, inputs)
    record = hf_collapse.collapse_record(collapsed)
    merged = collapsed.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    assert hf_collapse.collapse_record(merged) == record
    torch.testing.assert_close(output_of(merged, inputs), expected, atol=1e-5, rtol=0)

    save_with_card(merged, tmp_path / "merged")
    reloaded = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "merged")
    assert type(reloaded) is type(merged)
    assert hf_collapse.collapse_record(reloaded) == record
    torch.testing.assert_close(output_of(reloaded, inputs), expected, atol=1e-5, rtol=0)
    namespace = {}
    exec(loading_code(merged, str(tmp_path / "merged")), namespace)  # the card's code
    torch.testing.assert_close(output_of(namespace["model"].eval(), inputs), expected, atol=1e-5, rtol=0)
    if plain_exact:
        plain = type(merged).from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(output_of(plain, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case_name", ["bert", "llama"])
def test_remove_blocks_on_lora_model_refuses_to_save_and_merges_exactly(case_name, tmp_path):
    case, model = _lora(case_name)
    inputs = case.inputs()
    before = output_of(model, inputs)
    found = hf_collapse.find_blocks(model)[2]
    block = found.name  # its path in the peft model passed

    collapsed = hf_collapse.remove_blocks(model, [block])

    assert isinstance(collapsed, PeftModel)
    assert len(hf_collapse.find_blocks(collapsed)) == len(hf_collapse.find_blocks(model)) - 1
    # The record holds the backbone-relative name: it replays on the merged model, or under any other wrapper.
    assert hf_collapse.collapse_record(collapsed)["edits"] == [{"op": "remove_blocks", "blocks": [found.local_name]}]
    # The collapsed model still carries the adapter: removing the block from the merged model gives the same.
    reference = hf_collapse.remove_blocks(copy.deepcopy(model).merge_and_unload(), [block])
    torch.testing.assert_close(output_of(collapsed, inputs), output_of(reference, inputs), atol=1e-5, rtol=0)
    _refuses_to_save(collapsed, tmp_path)

    # The input model is untouched and still saves as an ordinary adapter.
    torch.testing.assert_close(output_of(model, inputs), before, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "original_adapter")
    assert (tmp_path / "original_adapter" / "adapter_config.json").is_file()

    _merged_reloads_exactly(collapsed, inputs, tmp_path, plain_exact=True)


def test_collapse_on_lora_model_refuses_to_save_and_merges_exactly(tmp_path):
    case, model = _lora("bert")
    inputs = case.inputs()
    scores = {b.name: float(i) for i, b in enumerate(reversed(hf_collapse.find_blocks(model)))}

    collapsed, report = hf_collapse.collapse(model, scores, num_units=2, latency_repeats=0, progress=False)

    assert isinstance(collapsed, PeftModel)
    assert report.after.removed == 2
    assert len(hf_collapse.find_blocks(collapsed)) == len(scores) - 2
    assert [e["op"] for e in hf_collapse.collapse_record(collapsed)["edits"]] == ["remove_blocks"] * 2
    _refuses_to_save(collapsed, tmp_path)
    _merged_reloads_exactly(collapsed, inputs, tmp_path, plain_exact=True)


def test_tlc_linearize_on_lora_model_refuses_to_save_and_merges_exactly(tmp_path):
    from hf_collapse.tlc import activation_statistics, linearize

    case, model = _lora("bert")
    inputs = case.inputs()
    stats = activation_statistics(model, [inputs])
    site = next(name for name in stats if ".1." in name)

    collapsed = linearize(model, stats[site])

    assert isinstance(collapsed, PeftModel)
    assert [e["op"] for e in hf_collapse.collapse_record(collapsed)["edits"]] == ["linearize"]
    _refuses_to_save(collapsed, tmp_path)
    # A block removal after the TLC edit keeps both edits and the refusal.
    collapsed = hf_collapse.remove_blocks(collapsed, ["encoder.layer.3"])
    assert [e["op"] for e in hf_collapse.collapse_record(collapsed)["edits"]] == ["linearize", "remove_blocks"]
    _refuses_to_save(collapsed, tmp_path)
    _merged_reloads_exactly(collapsed, inputs, tmp_path, plain_exact=False)


def test_lora_on_an_already_collapsed_model_is_an_ordinary_adapter_of_the_collapsed_base(tmp_path):
    """LoRA added after the collapse (healing): the adapter saves, and loads onto the collapsed base reloaded by
    AutoCollapsedModel; a card cannot name that base, so its loading code refuses instead of naming the wrong one."""
    case = CASES_BY_NAME["bert"]
    inputs = case.inputs()
    collapsed = hf_collapse.remove_blocks(case.build(), ["encoder.layer.1"])
    collapsed.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    tuned = get_peft_model(collapsed, LoraConfig(r=4, init_lora_weights=False, **LORA["bert"])).eval()
    expected = output_of(tuned, inputs)
    tuned.save_pretrained(tmp_path / "adapter")

    base = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "base")
    again = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(output_of(again, inputs), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
        loading_code(tuned, "me/collapsed-lora")


def test_collapse_that_removes_nothing_returns_the_lora_model_still_wrapped():
    case, model = _lora("bert")
    scores = {b.name: float(i) for i, b in enumerate(hf_collapse.find_blocks(model))}
    metrics = iter([0.9, 0.1])  # the first removal breaks the budget

    collapsed, report = hf_collapse.collapse(
        model, scores, max_metric_delta=0.01, eval_fn=lambda m: next(metrics), latency_repeats=0, progress=False
    )

    assert report.after.removed == 0 and collapsed is not model
    assert isinstance(collapsed, PeftModel)  # the adapter is still there, not merely its injected layers
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(collapsed(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_tlc_folds_lora_updates_on_the_linears_it_fuses():
    """LoRA on a site's producer and consumer: the fused map carries the adapter's update (none is lost)."""
    from hf_collapse.tlc import activation_statistics, linearize

    case = CASES_BY_NAME["bert"]
    torch.manual_seed(1)
    model = get_peft_model(
        case.build(), LoraConfig(r=4, init_lora_weights=False, task_type="SEQ_CLS", target_modules=["dense"])
    ).eval()
    inputs = case.inputs()
    stats = activation_statistics(model, [inputs])
    site = next(name for name in stats if ".1." in name)

    collapsed = linearize(model, stats[site])
    reference = linearize(copy.deepcopy(model).merge_and_unload(), stats[site])
    torch.testing.assert_close(output_of(collapsed, inputs), output_of(reference, inputs), atol=1e-5, rtol=0)
    merged = collapsed.merge_and_unload()
    torch.testing.assert_close(output_of(merged, inputs), output_of(reference, inputs), atol=1e-5, rtol=0)

"""Every kind of output reloads where the user stands: a fresh interpreter runs the model card's own loading code
(nothing imported before it) and gives the outputs of the model that was saved.

Kinds: block removal (plain and replayed), sub-layer removal, each TLC form (a single fused map, a thin pair, a
BatchNorm folded into a conv, silenced depthwise channels, GPT-2's Conv1D, a diffusers GELU), a healed model, a TraDy
adapter (``det_rgn``, whose selection needs its saved RGN) and the plain model merged from one, and diffusers pipelines
whose component loads plainly or through ``AutoCollapsedModel``.
"""

import json

import torch
from fresh_process import run_card_codes
from peft import get_peft_model
from test_tlc import trained_like
from tiny_models import CASES_BY_NAME, dit_pipeline, output_of, pipeline_images

import hf_collapse
from hf_collapse.hub import save_with_card
from hf_collapse.tlc import activation_sites, activation_statistics, linearize
from hf_collapse.trady import TraDyConfig, calibrate


def _linearized(case_name: str, fuse: bool, site_index: int = 1):
    case = CASES_BY_NAME[case_name]
    model = trained_like(case_name)
    site = activation_sites(model)[site_index]
    stats = activation_statistics(model, [case.inputs()], [site])[site.name]
    return linearize(model, stats, fuse=fuse), case.inputs()


def _trady_bert(selection: str):
    from test_trady import bert_batch

    torch.manual_seed(0)
    base = CASES_BY_NAME["bert"].build().train()
    peft_model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, selection=selection))
    calibrate(peft_model, [bert_batch(seed=s) for s in range(2)])
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model(**bert_batch(seed=5)).loss.backward()
    optimizer.step()
    return peft_model.eval()


def _outputs(tmp_path):
    """``{kind: (saved folder, inputs, expected output)}`` for every kind of output."""
    made = {}

    def keep(kind, model, inputs, expected=None, **card):
        folder = tmp_path / kind
        save_with_card(model, folder, **card)
        made[kind] = (folder, inputs, output_of(model, inputs) if expected is None else expected)

    bert = CASES_BY_NAME["bert"]
    keep("removal_plain", hf_collapse.remove_blocks(bert.build(), ["bert.encoder.layer.1"]), bert.inputs())
    mobilenet = CASES_BY_NAME["mobilenet_v2"]
    keep("removal_replayed", hf_collapse.remove_blocks(mobilenet.build(), ["layer.4"]), mobilenet.inputs())
    llama = CASES_BY_NAME["llama"]
    keep("sublayers", hf_collapse.remove_blocks(llama.build(), ["model.layers.1.self_attn"]), llama.inputs())

    for kind, (case_name, fuse) in {
        "tlc_bert_fused": ("bert", True),
        "tlc_bert_thin": ("bert", False),
        "tlc_resnet_bn_folded": ("resnet_basic", True),
        "tlc_mobilenet_silenced": ("mobilenet_v2", True),
        "tlc_gpt2": ("gpt2", True),
        "tlc_dit_gelu": ("dit", True),
    }.items():
        keep(kind, *_linearized(case_name, fuse))

    teacher = llama.build()
    student = hf_collapse.remove_blocks(teacher, ["model.layers.2"])
    batches = [
        {"input_ids": torch.randint(3, 99, (4, 12), generator=torch.Generator().manual_seed(s))} for s in range(4)
    ]
    healed = hf_collapse.heal(student, teacher, batches, method="linear", calibration_batches=4)
    keep("healed", healed, llama.inputs())

    keep("trady_merged", _trady_bert("trady").merge_and_unload(), bert.inputs())
    base_folder = tmp_path / "trady_base"
    torch.manual_seed(0)
    bert.build().save_pretrained(base_folder)  # the adapter's card loads its base from here, by name
    from test_trady import bert_batch
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(base_folder)
    adapter = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1, selection="det_rgn"))
    calibrate(adapter, [bert_batch(seed=s) for s in range(2)])
    optimizer = torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=0.5)
    adapter.train()(**bert_batch(seed=5)).loss.backward()
    optimizer.step()
    keep("trady_adapter_det_rgn", adapter.eval(), bert.inputs())

    pipe = dit_pipeline()
    pipe.transformer = hf_collapse.remove_blocks(pipe.transformer, ["transformer_blocks.1"]).eval()
    keep("pipeline_plain", pipe, None, expected=pipeline_images(pipe))
    pipe = dit_pipeline()
    site = activation_sites(pipe.transformer)[1]
    dit_inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([3, 7]),
        "class_labels": torch.tensor([1, 0]),
    }
    stats = activation_statistics(pipe.transformer, [dit_inputs], [site])[site.name]
    pipe.transformer = linearize(pipe.transformer, stats).eval()
    keep("pipeline_replayed", pipe, None, expected=pipeline_images(pipe))
    return made


def test_every_kind_of_output_reloads_with_its_cards_code_in_a_fresh_process(tmp_path):
    made = _outputs(tmp_path)
    forms = {
        (e["form"], e["bn_folded"], e["cut"])
        for kind, (folder, _, _) in made.items()
        if kind.startswith("tlc")
        for e in json.loads((folder / "config.json").read_text())["hf_collapse"]["edits"]
    }
    assert {form for form, _, _ in forms} == {"single", "pair"}
    assert any(bn_folded for _, bn_folded, _ in forms) and any(not cut for _, _, cut in forms)

    results = run_card_codes({kind: (folder, inputs) for kind, (folder, inputs, _) in made.items()})
    for kind, (_, _, expected) in made.items():
        output = results[kind]["output"]
        assert output.shape == expected.shape, kind
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=lambda m, kind=kind: f"{kind}: {m}")
    assert results["trady_adapter_det_rgn"]["class"] == "PeftModelForSequenceClassification"
    assert results["pipeline_replayed"]["class"] == "DiTPipeline"

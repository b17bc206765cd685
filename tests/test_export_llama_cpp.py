"""GGUF and the DeciLM layout, checked by llama.cpp itself (llama-cpp-python, built from source by the dev install):
llama.cpp's own converter writes the file, llama.cpp computes the logits, here and in a fresh process where the user
stands, and they are compared with the PyTorch model the export came from.

The models are tiny random-init Llamas carrying SmolLM2's real tokenizer (llama.cpp's converter recognises a BPE
tokenizer by hashing its output: a made-up one is refused). Their FFN width (256) is one the DeciLM layout expresses.
"""

from __future__ import annotations

import json
import subprocess
import sys

import llama_cpp  # noqa: F401  # installed by the dev setup (make install): a missing runtime fails, never skips
import numpy as np
import pytest
import torch
from tiny_models import CASES_BY_NAME, save_tiny_llm_with_smollm2_tokenizer

import hf_collapse
from hf_collapse.commands import main
from hf_collapse.export import export
from hf_collapse.export.decilm import decilm_layout, write_decilm
from hf_collapse.export.llama_cpp import convert, logits_runner

FRESH_LLAMA_CPP = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=1)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[: len(ids)], dtype=np.float32))
print(json.dumps({"arch": llm.metadata.get("general.architecture")}))
"""

IDS = [504, 1345, 1064, 282, 260, 3868, 30, 378, 5347, 2117, 28, 253, 2470, 25]  # not the export's check inputs


def _fresh_logits(path, ids, tmp_path):
    """llama.cpp's logits for ``ids`` from the GGUF at ``path``, computed in a fresh process."""
    result = tmp_path / "logits.npy"
    done = subprocess.run(
        [sys.executable, "-c", FRESH_LLAMA_CPP, str(path), json.dumps(ids), str(result)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(result), json.loads(done.stdout.strip().splitlines()[-1])


def _pytorch_logits(folder, ids):
    model = hf_collapse.AutoCollapsedModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "original"
    return save_tiny_llm_with_smollm2_tokenizer(folder, num_hidden_layers=4, hidden_size=64, intermediate_size=256)


def _removed(tiny_llama, tmp_path, *steps):
    """``tiny_llama`` after each step ``(granularity, [layer indices])`` in turn, saved with its tokenizer."""
    from transformers import AutoTokenizer

    model = hf_collapse.AutoCollapsedModel.from_pretrained(tiny_llama)
    for granularity, units in steps:
        names = [unit.name for unit in hf_collapse.find_blocks(model, granularity)]
        model = hf_collapse.remove_blocks(model, [names[i] for i in units])
    folder = tmp_path / "removed"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def _gguf_architecture(path):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def test_a_block_removal_runs_in_llama_cpp_as_in_pytorch(tiny_llama, tmp_path):
    folder = _removed(tiny_llama, tmp_path, ("block", [1]))
    report = export(folder, tmp_path / "gguf", format="gguf", quantize="f32", reference=tiny_llama, repeats=2)
    assert report.runtime.startswith("llama.cpp") and report.max_abs_difference <= report.tolerance
    assert report.speedup is not None and report.reference_runtime_ms > 0
    path = tmp_path / "gguf" / "model-f32.gguf"
    assert _gguf_architecture(path) == "llama"  # the family's own architecture, one layer fewer
    got, _ = _fresh_logits(path, IDS, tmp_path)
    np.testing.assert_allclose(got, _pytorch_logits(folder, IDS), atol=1e-4)
    card = (tmp_path / "gguf" / "README.md").read_text()
    assert "## Run it with llama.cpp" in card and "llama-cli -m model-f32.gguf" in card
    assert f"{report.speedup:.2f}x faster in llama.cpp" in card


def test_sublayer_removals_run_in_llama_cpp_in_the_decilm_layout(tiny_llama, tmp_path):
    # layer 3 removed whole, then the attention of layers 0 and 2 and the MLP of layer 1: every case of the layout
    folder = _removed(tiny_llama, tmp_path, ("block", [3]), ("attention", [0, 2]), ("mlp", [1]))
    report = export(folder, tmp_path / "gguf", format="gguf", quantize="f32", repeats=2)
    path = tmp_path / "gguf" / "model-f32.gguf"
    assert _gguf_architecture(path) == "deci"
    assert report.max_abs_difference <= report.tolerance
    got, _ = _fresh_logits(path, IDS, tmp_path)
    np.testing.assert_allclose(got, _pytorch_logits(folder, IDS), atol=1e-4)
    notes = " ".join(report.notes)
    assert "Layers [1] lost their MLP: each carries a zero FFN of width 256" in notes
    assert "Layer 0 lost its attention but is the first layer: it carries a zero attention" in notes
    blocks = json.loads(decilm_config_of(folder))["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True]  # layer 2 has none at all


def test_the_decilm_folder_is_what_the_runtimes_read(tiny_llama, tmp_path):
    from transformers import AutoConfig

    folder = _removed(tiny_llama, tmp_path, ("attention", [2]), ("mlp", [1]))
    report = export(folder, tmp_path / "decilm", format="decilm", repeats=2)
    assert report.max_abs_difference <= report.tolerance and report.runtime.startswith("llama.cpp")
    saved = json.loads((tmp_path / "decilm" / "config.json").read_text())
    assert saved["architectures"] == ["DeciLMForCausalLM"] and saved["num_hidden_layers"] == 4
    attention, ffn = saved["block_configs"][2]["attention"], saved["block_configs"][1]["ffn"]
    assert attention["no_op"] is True and attention["n_heads_in_group"] is None  # vLLM reads one, llama.cpp the other
    assert ffn["no_op"] is False and ffn["ffn_mult"] is not None  # the zero FFN, not a null one (see below)
    # vLLM and SGLang load the config with trust_remote_code and read block_configs as objects: from a fresh process
    code = (
        "import sys; from transformers import AutoConfig; c = AutoConfig.from_pretrained(sys.argv[1], "
        "trust_remote_code=True); print(c.model_type, c.block_configs[2].attention.no_op, "
        "c.block_configs[0].attention.n_heads_in_group, c.block_configs[0].ffn.ffn_mult)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "decilm")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["nemotron-nas", "True", "2", "6.0"]
    assert (
        AutoConfig.from_pretrained(tmp_path / "decilm", trust_remote_code=True).to_dict()["block_configs"]
        == (saved["block_configs"])
    )
    assert "trust_remote_code=True" in (tmp_path / "decilm" / "README.md").read_text()


def test_llama_cpp_reads_a_null_ffn_wrongly_which_is_why_the_layout_carries_a_zero_one(tiny_llama, tmp_path):
    """Pinned against the runtime: with ``ffn: {no_op: true, ffn_mult: null}`` llama.cpp discards the layer's attention
    output too (it agrees with the whole layer removed), so the export writes a zero FFN instead."""
    folder = _removed(tiny_llama, tmp_path, ("mlp", [1]))
    model = hf_collapse.AutoCollapsedModel.from_pretrained(folder).eval()
    layout = decilm_layout(model)
    null_ffn = tmp_path / "null-ffn"
    write_decilm(model, null_ffn)
    config = json.loads((null_ffn / "config.json").read_text())
    config["block_configs"][1]["ffn"].update(no_op=True, ffn_mult=None)
    (null_ffn / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    kept = {k: v for k, v in layout.state_dict.items() if not k.startswith("model.layers.1.mlp.")}
    kept.pop("model.layers.1.post_attention_layernorm.weight")
    save_file({k: v.contiguous() for k, v in kept.items()}, str(null_ffn / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (null_ffn / name).write_bytes((folder / name).read_bytes())
    ids = np.array([IDS])
    wrong = logits_runner(convert(null_ffn, tmp_path / "null.gguf"))({"input_ids": ids})[0][0]
    expected = _pytorch_logits(folder, IDS)
    whole_layer_removed = _pytorch_logits(_removed(tiny_llama, tmp_path / "b", ("block", [1])), IDS)
    assert np.abs(wrong - expected).max() > 1e-2  # the runtime computes another model...
    np.testing.assert_allclose(wrong, whole_layer_removed, atol=1e-4)  # ...the one without layer 1 at all
    right = logits_runner(convert(_decilm_folder(model, folder, tmp_path / "zero-ffn"), tmp_path / "zero.gguf"))
    np.testing.assert_allclose(right({"input_ids": ids})[0][0], expected, atol=1e-4)


def decilm_config_of(folder):
    return json.dumps(decilm_layout(hf_collapse.AutoCollapsedModel.from_pretrained(folder)).config)


def _decilm_folder(model, tokenizer_folder, target):
    write_decilm(model, target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((tokenizer_folder / name).read_bytes())
    return target


@pytest.mark.slow
def test_quantized_files_are_measured_not_assumed_and_run_from_a_fresh_process(tiny_llama, tmp_path):
    folder = _removed(tiny_llama, tmp_path, ("block", [2]))
    for type_name in ("q8_0", "q4_k_m"):
        out = tmp_path / type_name
        report = export(folder, out, format="gguf", quantize=type_name, repeats=2)
        assert [p.rsplit("/", 1)[-1] for p in report.files if p.endswith(".gguf")] == [f"model-{type_name}.gguf"]
        assert not (out / "model-f32.gguf").exists()  # the checked f32 conversion is not left behind
        assert any(note.startswith(f"{type_name}: largest logit difference from PyTorch") for note in report.notes)
        got, _ = _fresh_logits(out / f"model-{type_name}.gguf", IDS, tmp_path)
        assert got.shape == (len(IDS), 49152) and np.isfinite(got).all()


def test_what_gguf_and_decilm_cannot_express_is_refused_before_any_work(tiny_llama, tmp_path):
    from hf_collapse.tlc import activation_sites, activation_statistics, linearize

    qwen3 = CASES_BY_NAME["qwen3"].build()
    smaller = hf_collapse.remove_blocks(qwen3, [hf_collapse.find_blocks(qwen3, "attention")[0].name])
    for fmt in ("decilm", "gguf"):
        with pytest.raises(ValueError, match=r"cannot be written in the DeciLM layout: its family is 'qwen3'"):
            export(smaller, tmp_path / "q", format=fmt)
    gpt2 = CASES_BY_NAME["gpt2"].build().eval()
    inputs = CASES_BY_NAME["gpt2"].inputs()
    site = activation_sites(gpt2)[0]
    fused = linearize(gpt2, activation_statistics(gpt2, [inputs], [site])[site.name], fuse=True)
    with pytest.raises(ValueError, match=r"was edited by linearize: no llama.cpp architecture holds"):
        export(fused, tmp_path / "f", format="gguf")
    with pytest.raises(ValueError, match=r"the gguf export writes the tokenizer too: give the saved folder"):
        export(CASES_BY_NAME["llama"].build(), tmp_path / "t", format="gguf")
    with pytest.raises(ValueError, match=r"unknown GGUF type 'q3_x' for quantize; accepted: f32, f16, q8_0"):
        export(tiny_llama, tmp_path / "x", format="gguf", quantize="q3_x")
    with pytest.raises(ValueError, match=r"the onnx export takes no option \['quantize'\]"):
        export(tiny_llama, tmp_path / "o", format="onnx", quantize="f16")
    with pytest.raises(ValueError, match=r"GGUF export covers decoders"):
        export(CASES_BY_NAME["bert"].build(), tmp_path / "b", format="gguf")
    assert not any((tmp_path / name).exists() for name in "qftxob")


def test_the_export_command_quantizes_a_pruned_decoder(tiny_llama, tmp_path, capsys):
    folder = _removed(tiny_llama, tmp_path, ("block", [1]))
    argv = ["export", str(folder), "--output", str(tmp_path / "cli"), "--format", "gguf", "--quantize", "q8_0"]
    assert main([*argv, "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gguf: {tmp_path / 'cli'} (llama.cpp") and "q8_0: largest logit difference" in out
    assert (tmp_path / "cli" / "model-q8_0.gguf").is_file()
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "gguf: the served file's type" in " ".join(capsys.readouterr().out.split())

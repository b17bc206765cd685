"""Exporting for serving runtimes: what ``hf_collapse.export`` writes is run by the runtime itself (ONNX Runtime, a
real one, in a fresh process where the user stands) and compared with the PyTorch model it came from: a block-removed
encoder, a TLC-fused one (fused linear maps) and a vision model, on two input shapes (the batch and the sequence
length stay free). Every registered format passes the same contract; a new one is one file and one registration."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import CASES_BY_NAME, bert, save_tiny_llm_with_smollm2_tokenizer, vit
from toy_extensions import TorchScriptExport, registered_toys

import hf_collapse
from hf_collapse.commands import main
from hf_collapse.export import EXPORTS, export
from hf_collapse.metrics import example_inputs

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime) is a dev dependency")

FRESH_ORT = """
import json, sys
import numpy as np, onnxruntime as ort
folder, inputs = sys.argv[1], np.load(sys.argv[2])
session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
np.save(sys.argv[3], session.run(None, {n: inputs[n] for n in names})[0])
print(json.dumps(names))
"""


def _run_in_fresh_runtime(folder, inputs, tmp_path):
    """The first output of ``folder/model.onnx`` on ``inputs``, computed by ONNX Runtime in a fresh process."""
    feed, result = tmp_path / "inputs.npz", tmp_path / "output.npy"
    np.savez(feed, **{k: v.numpy() for k, v in inputs.items()})
    done = subprocess.run(
        [sys.executable, "-c", FRESH_ORT, str(folder), str(feed), str(result)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(result), json.loads(done.stdout.strip().splitlines()[-1])


def _collapsed_bert(tmp_path):
    original = bert().eval()
    smaller = hf_collapse.remove_blocks(original, [hf_collapse.find_blocks(original)[2].name])
    original.save_pretrained(tmp_path / "original")
    smaller.save_pretrained(tmp_path / "collapsed")
    return original, smaller


def test_a_collapsed_encoder_runs_in_onnx_runtime_as_in_pytorch_at_any_batch_and_length(tmp_path):
    _, smaller = _collapsed_bert(tmp_path)
    report = export(tmp_path / "collapsed", tmp_path / "onnx", reference=tmp_path / "original", repeats=3)
    assert report.format == "onnx" and report.runtime.startswith("ONNX Runtime")
    assert report.max_abs_difference <= report.tolerance and len(report.shapes) == 2
    assert report.speedup is not None and report.reference_runtime_ms > 0 and report.runtime_ms > 0
    for batch, length in ((1, 9), (4, 23)):  # shapes the export never saw
        inputs = example_inputs(smaller, batch_size=batch, seq_len=length)
        got, names = _run_in_fresh_runtime(tmp_path / "onnx", inputs, tmp_path)
        with torch.no_grad():
            expected = hf_collapse.AutoCollapsedModel.from_pretrained(tmp_path / "collapsed")(**inputs).logits
        assert names == ["input_ids", "attention_mask"]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert "## Run it with ONNX Runtime" in card and 'ort.InferenceSession("model.onnx"' in card
    assert f"{report.speedup:.2f}x faster in ONNX Runtime" in card
    saved = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert saved["max_abs_difference"] == report.max_abs_difference
    assert (tmp_path / "onnx" / "config.json").is_file()  # the folder describes the model it holds


def test_a_tlc_fused_encoder_exports_with_its_fused_maps(tmp_path):
    from hf_collapse.tlc import activation_sites, activation_statistics, linearize

    model = bert().eval()
    inputs = CASES_BY_NAME["bert"].inputs()
    site = activation_sites(model)[1]
    fused = linearize(model, activation_statistics(model, [inputs], [site])[site.name], fuse=True)
    fused.save_pretrained(tmp_path / "fused")
    report = export(tmp_path / "fused", tmp_path / "onnx", repeats=2)
    got, _ = _run_in_fresh_runtime(tmp_path / "onnx", inputs, tmp_path)
    with torch.no_grad():
        expected = fused(**inputs).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert report.max_abs_difference <= report.tolerance


def test_a_vision_model_exports_with_a_free_batch(tmp_path):
    model = vit().eval()
    report = export(model, tmp_path / "onnx", repeats=2)
    assert [shape["pixel_values"][0] for shape in report.shapes] == [2, 3]
    pixels = example_inputs(model, batch_size=5)
    got, names = _run_in_fresh_runtime(tmp_path / "onnx", pixels, tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**pixels).logits.numpy(), atol=1e-5, rtol=1e-4)
    assert names == ["pixel_values"]


def test_what_a_format_cannot_express_is_refused_before_any_work(tmp_path):
    decoder = CASES_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match=r"is a causal LM: ONNX export here covers encoders and vision models"):
        export(decoder, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; accepted: onnx, gguf, decilm"):
        export(bert(), tmp_path / "out", format="tflite")
    assert not (tmp_path / "out").exists()


def test_the_export_command_writes_checks_and_times(tmp_path, capsys):
    _collapsed_bert(tmp_path)
    argv = ["export", str(tmp_path / "collapsed"), "--output", str(tmp_path / "cli"), "--repeats", "2"]
    assert main([*argv, "--reference", str(tmp_path / "original")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"onnx: {tmp_path / 'cli'} (ONNX Runtime") and "faster than the reference there" in out
    assert (tmp_path / "cli" / "model.onnx").is_file() and (tmp_path / "cli" / "README.md").is_file()
    assert main(["export", str(tmp_path / "collapsed"), "--output", str(tmp_path / "x"), "--format", "gif"]) == 2
    assert "invalid choice: 'gif'" in capsys.readouterr().err


def check_export_format(fmt, tmp_path) -> None:
    """The contract of an export format: for each family it declares, a tiny model of that family is written, run by
    the runtime within tolerance on two shapes, timed, and given a card saying how to run it."""

    def decoder():  # a saved folder with a tokenizer llama.cpp's converter knows, FFN widths DeciLM expresses
        return save_tiny_llm_with_smollm2_tokenizer(tmp_path / "decoder", 2, hidden_size=64, intermediate_size=256)

    models = {"encoder": lambda: bert().eval(), "vision": lambda: vit().eval(), "decoder": decoder}
    assert fmt.description and fmt.runtime and fmt.families
    for family in fmt.families:
        folder = tmp_path / f"{fmt.name}-{family}"
        report = export(models[family](), folder, format=fmt.name, repeats=2)
        assert report.max_abs_difference <= report.tolerance and report.runtime_ms > 0
        assert f"## Run it with {fmt.runtime}" in (folder / "README.md").read_text()


@pytest.mark.parametrize("name", list(EXPORTS))
def test_every_registered_export_format_honours_the_contract(name, tmp_path):
    check_export_format(EXPORTS.get(name), tmp_path)


def test_a_new_export_format_is_one_file_and_one_registration(tmp_path, capsys):
    with registered_toys():
        check_export_format(EXPORTS.get(TorchScriptExport.name), tmp_path)
        with pytest.raises(SystemExit):
            main(["export", "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert f"{TorchScriptExport.name} ({TorchScriptExport.description})" in shown
    assert TorchScriptExport.name not in EXPORTS


def test_an_export_whose_runtime_disagrees_with_pytorch_is_refused(tmp_path):
    """The check is the runtime's own outputs against PyTorch's: a format whose runtime returns something else (here
    ONNX Runtime's outputs nudged by 1e-3 of their scale, or cut to another shape) is refused and gets no card."""
    from hf_collapse.export.onnx import ONNX

    class Nudged(ONNX):
        name = "test_nudged"

        def __init__(self, change):
            self.change = change

        def runner(self, output, threads=1):
            run = super().runner(output, threads)
            return lambda inputs: [self.change(value) for value in run(inputs)]

    cases = {
        "nudged": (lambda v: v + 1e-3 * np.abs(v).max(), r"outputs differ from PyTorch's by .* the export is wrong"),
        "cut": (lambda v: v[:1], r"returned \[\(1, 3\).* where PyTorch returns \[\(2, 3\).* the export is wrong"),
    }
    for case, (change, message) in cases.items():
        EXPORTS.register(Nudged(change))
        try:
            with pytest.raises(ValueError, match=message):
                export(bert().eval(), tmp_path / case, format="test_nudged", repeats=1)
        finally:
            EXPORTS.unregister("test_nudged")
        assert not (tmp_path / case / "README.md").exists()

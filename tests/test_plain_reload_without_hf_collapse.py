"""Collapsed models whose config expresses the change load with plain transformers / diffusers
``from_pretrained`` in a fresh interpreter that never imports hf_collapse."""

import json
import subprocess
import sys
import textwrap

import torch
from tiny_models import CASES_BY_NAME, output_of

import hf_collapse

EXPRESSIBLE = {
    "bert": ["encoder.layer.0", "encoder.layer.3"],
    "vit": ["layers.4"],
    "swin": ["encoder.layers.0.blocks.2", "encoder.layers.0.blocks.3"],
    "resnet_basic": ["encoder.stages.0.layers.0"],
    "gpt2": ["h.2"],
    "qwen2": ["layers.1"],
    "dit": ["transformer_blocks.2"],
    "unet": ["down_blocks.0.resnets.0", "down_blocks.1.resnets.2"],
}


def test_plain_from_pretrained_in_a_clean_interpreter(tmp_path):
    manifest = {}
    for name, removal in EXPRESSIBLE.items():
        case = CASES_BY_NAME[name]
        collapsed = hf_collapse.remove_blocks(case.build(), removal)
        assert hf_collapse.collapse_record(collapsed)["plain_reload_exact"]
        folder = tmp_path / name
        collapsed.save_pretrained(folder)
        torch.save({"inputs": case.inputs(), "expected": output_of(collapsed, case.inputs())}, folder / "check.pt")
        library = type(collapsed).__module__.split(".")[0]
        manifest[name] = [str(folder), library, type(collapsed).__name__]

    script = textwrap.dedent("""
        import json, sys, torch, transformers, diffusers
        failures = []
        for name, (folder, library, cls_name) in json.loads(sys.argv[1]).items():
            cls = getattr(transformers if library == "transformers" else diffusers, cls_name)
            model, info = cls.from_pretrained(folder, output_loading_info=True)
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            check = torch.load(folder + "/check.pt")
            with torch.no_grad():
                out = model.eval()(**check["inputs"])
            out = out.logits if hasattr(out, "logits") else (out.sample if hasattr(out, "sample") else out[0])
            err = (out - check["expected"]).abs().max().item()
            if bad or err > 1e-5:
                failures.append((name, bad, err))
        assert "hf_collapse" not in sys.modules, "hf_collapse was imported"
        print(json.dumps(failures))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(manifest)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

"""`import hf_collapse` has no side effects and is light; every public name still resolves where it always was;
TraDy registers itself with peft when hf_collapse.trady is first used. Each check runs in a fresh interpreter."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ["peft", "diffusers", "transformers.trainer"]


def run_fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line, returned parsed."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_leaves_peft_diffusers_and_the_trainer_alone():
    out = run_fresh(f"""
        import json, sys
        import hf_collapse
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        dir_ok = set(hf_collapse.__all__) <= set(dir(hf_collapse))
        import peft                                   # the user's own import: peft as shipped
        from peft.utils import PeftType
        print(json.dumps({{"loaded": loaded, "trady_in_peft": "TRADY" in PeftType.__members__, "dir_ok": dir_ok,
                          "version": hf_collapse.__version__}}))
    """)
    assert out["loaded"] == []
    assert out["trady_in_peft"] is False
    assert out["dir_ok"] and out["version"]


def test_every_public_name_resolves_lazily():
    out = run_fresh("""
        import json, types
        import hf_collapse
        names = {}
        for name in hf_collapse.__all__:
            value = getattr(hf_collapse, name)
            names[name] = type(value).__name__
        from hf_collapse import LaCoOTTrainer, TraDyConfig, find_blocks   # `from ... import` goes through it too
        from hf_collapse.lacoot import LaCoOTTrainer as defined
        missing = None
        try:
            hf_collapse.no_such_name
        except AttributeError as error:
            missing = str(error)
        print(json.dumps({"names": names, "same": LaCoOTTrainer is defined, "missing": missing,
                          "surgery": isinstance(hf_collapse.surgery, types.ModuleType)}))
    """)
    names = out["names"]
    assert set(names) == {
        "ActivationSite",
        "ArchitectureAdapter",
        "AutoCollapsedModel",
        "Block",
        "Budget",
        "CollapseReport",
        "CollapseStep",
        "LaCoOTArguments",
        "LaCoOTTrainer",
        "MSWPenalty",
        "TLCConfig",
        "TraDyCallback",
        "TraDyConfig",
        "TraDyModel",
        "adapter_for",
        "collapse",
        "collapse_record",
        "find_blocks",
        "hub",
        "heal",
        "DistillationTrainer",
        "prune",
        "push_to_hub",
        "register_architecture",
        "remove_blocks",
        "run_pipeline",
        "score_blocks",
        "supported_families",
        "tlc",
        "trady",
        "unregister_architecture",
    }
    assert names["hub"] == names["tlc"] == names["trady"] == "module"
    assert names["find_blocks"] == "function" and names["LaCoOTTrainer"] == "type"
    assert out["same"] and out["surgery"]
    assert "has no attribute 'no_such_name'" in out["missing"]


def test_touching_trady_registers_it_with_peft():
    out = run_fresh("""
        import json
        import hf_collapse
        config = hf_collapse.TraDyConfig(task_type="SEQ_CLS")        # first use of a TraDy name
        from peft.utils import PeftType
        print(json.dumps({"registered": "TRADY" in PeftType.__members__, "type": str(config.peft_type)}))
    """)
    assert out["registered"] is True and out["type"].endswith("TRADY")


def test_peft_reloads_a_trady_adapter_in_a_fresh_process_after_import_hf_collapse_trady(tmp_path):
    """Save in one process, reload with PeftModel.from_pretrained in another that only imports hf_collapse.trady."""
    run_fresh(f"""
        import json, torch
        from peft import get_peft_model
        import tiny_models
        from test_trady import bert_batch
        from hf_collapse.trady import TraDyConfig, calibrate
        torch.manual_seed(0)
        base = tiny_models.bert()
        base.save_pretrained({str(tmp_path / "base")!r})
        model = get_peft_model(base.train(), TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
        calibrate(model, [bert_batch(seed=s) for s in range(2)])
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**bert_batch(seed=5)).loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            torch.save(model(**bert_batch(seed=3)).logits, {str(tmp_path / "expected.pt")!r})
        model.save_pretrained({str(tmp_path / "adapter")!r})
        print(json.dumps({{}}))
    """)
    out = run_fresh(f"""
        import json, sys, torch
        import hf_collapse.trady  # registers TraDy with peft
        from peft import PeftModel
        from transformers import BertForSequenceClassification
        from test_trady import bert_batch
        base = BertForSequenceClassification.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            logits = model(**bert_batch(seed=3)).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print(json.dumps({{"diff": float((logits - expected).abs().max()),
                          "tuner": type(model.base_model).__name__}}))
    """)
    assert out["tuner"] == "TraDyModel"
    assert out["diff"] <= 1e-6


def test_collapse_stays_the_function_whatever_is_imported_first():
    out = run_fresh("""
        import json
        from hf_collapse.removal import RemovalStrategy   # the submodule that defines it, first
        from hf_collapse.tlc import linearize             # which imports it too
        import hf_collapse
        print(json.dumps({"type": type(hf_collapse.collapse).__name__}))
    """)
    assert out["type"] == "function"


def test_the_command_answers_help_without_loading_torch():
    """hf-collapse --help (and any argument check of the command itself) imports nothing heavy."""
    out = run_fresh("""
        import contextlib, io, json, sys
        from hf_collapse.commands import main
        with contextlib.redirect_stdout(io.StringIO()) as text:
            try:
                main(["--help"])
            except SystemExit as done:
                code = done.code
        print(json.dumps({"code": code, "usage": "usage: hf-collapse" in text.getvalue(),
                          "heavy": [m for m in ("torch", "transformers", "peft", "diffusers") if m in sys.modules]}))
    """)
    assert out == {"code": 0, "usage": True, "heavy": []}

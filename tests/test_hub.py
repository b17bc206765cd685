"""Model cards and pushing to the Hub, end to end with the real huggingface_hub client.

No hub is needed: tests/local_hub.py, the project's own stand-in, serves the client's publish and download calls on
loopback, and these tests push to it and pull back from it. With HF_COLLAPSE_REAL_HUB=1 and HF_TOKEN set they push to
private repositories on the real Hub instead (deleted afterwards). Card content itself is also tested without a hub.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from local_hub import REAL_HUB_SWITCH, REPO_PREFIX, running_hub
from tiny_models import CASES_BY_NAME

import hf_collapse
from hf_collapse.hub import loading_code, model_card


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """(store, endpoint): the local hub stand-in, whose store holds what was pushed; or, with HF_COLLAPSE_REAL_HUB=1,
    the Hub at HF_ENDPOINT (default the real one) with HF_TOKEN, under a per-run repository prefix."""
    if os.environ.get(REAL_HUB_SWITCH) == "1":
        if not os.environ.get("HF_TOKEN"):
            pytest.skip(f"{REAL_HUB_SWITCH}=1 publishes to the real Hub: it needs a write token in HF_TOKEN")
        prefix = f"hf-collapse-test-{uuid.uuid4().hex[:8]}-"
        monkeypatch.setenv(REPO_PREFIX, prefix)  # the round-trip scripts name their repositories with it
        yield tmp_path / "hub", os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        cleanup = subprocess.run(
            [sys.executable, "-c", f"import local_hub; local_hub.delete_test_repos({prefix!r})"],
            cwd=Path(__file__).parent,
            env={**os.environ, "HF_HUB_OFFLINE": "0"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cleanup.returncode == 0, f"could not delete the {prefix}* test repositories: {cleanup.stderr[-2000:]}"
        return
    with running_hub(tmp_path / "hub") as endpoint:
        yield tmp_path / "hub", endpoint


def test_push_and_pull_through_the_hub(hub, tmp_path):
    store, endpoint = hub
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "hub" / "push_roundtrip.py"), str(store)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    findings = json.loads(result.stdout.strip().splitlines()[-1])
    for name, found in findings.items():
        assert found["metric_value"] == found["report_metric"] == 0.75, name
        assert found["params_in_card"] and found["flops_in_card"], name
        library = "diffusers" if name.startswith("dit") else "transformers"
        weights = "diffusion_pytorch_model.safetensors" if name.startswith("dit") else "model.safetensors"
        if name.startswith("dit_pipeline"):
            files = {
                "README.md",
                "tradeoff.png",
                "model_index.json",
                "scheduler/scheduler_config.json",
                "transformer/config.json",
                f"transformer/{weights}",
                "vae/config.json",
                f"vae/{weights}",
            }
            assert found["names_component"] and found["unchanged_by_push"], name
        else:
            files = {"README.md", "config.json", weights, "tradeoff.png"}
        assert "hf-collapse" in found["tags"] and found["library"] == library
        assert found["card_code_error"] <= 1e-5, name
        assert found["same_files"] and found["same_bytes"], found["files"]
        assert files <= set(found["files"]), found["files"]
        assert found["pulled_error"] <= 1e-5, name
    assert not findings["bert"]["uses_auto_collapsed"]  # the config expresses a removed BERT layer
    assert findings["mobilenet_v2"]["uses_auto_collapsed"]  # MobileNetV2's does not
    assert not findings["dit"]["uses_auto_collapsed"]  # diffusers' num_layers does
    assert not findings["dit_pipeline"]["uses_auto_collapsed"]  # ... also inside a pipeline
    assert findings["dit_pipeline_tlc"]["uses_auto_collapsed"]  # a linearized MLP is not in the config


def test_card_without_a_hub(tmp_path):
    case = CASES_BY_NAME["swin"]
    collapsed, report = hf_collapse.collapse(
        case.build(), {"encoder.layers.0.blocks.0": 0.1}, num_units=1, latency_repeats=1, progress=False
    )
    card = model_card(collapsed, report, base_model="microsoft/swin-tiny-patch4-window7-224")
    assert card.data.base_model == "microsoft/swin-tiny-patch4-window7-224"
    assert "encoder.layers.0.blocks.0" in card.text and "AutoCollapsedModel" in card.text  # shift pattern flipped
    code = loading_code(collapsed, str(tmp_path))
    collapsed.save_pretrained(tmp_path)
    namespace = {}
    exec(code, namespace)
    with torch.no_grad():
        inputs = case.inputs()
        torch.testing.assert_close(
            namespace["model"](**inputs).logits, collapsed.eval()(**inputs).logits, atol=1e-5, rtol=0
        )


def test_card_and_save_of_a_trady_adapter(tmp_path):
    """A TraDy adapter is saved as an adapter, and its card loads it with PeftModel.from_pretrained."""
    from peft import get_peft_model
    from test_trady import bert_batch

    from hf_collapse.hub import save_with_card
    from hf_collapse.trady import calibrate

    base = CASES_BY_NAME["bert"].build()
    base.save_pretrained(tmp_path / "base")  # the untouched base model, as it would be on the Hub
    model = get_peft_model(base.train(), hf_collapse.TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.1))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")  # set from the Hub id normally
    calibrate(model, [bert_batch(seed=s) for s in range(2)])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**bert_batch(seed=5)).loss.backward()
    optimizer.step()
    model.eval()
    batch = bert_batch(seed=3)
    with torch.no_grad():
        expected = model(**batch).logits
    save_with_card(model, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "TRADY" in card and "PeftModel.from_pretrained" in card
    namespace = {}
    exec(loading_code(model, str(tmp_path / "adapter")), namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(**batch).logits, expected, atol=1e-5, rtol=0)


def test_pipeline_card_names_the_collapsed_component_and_refuses_a_mismatch(tmp_path):
    """A pipeline's card describes its collapsed component; a report about another model, or a processor passed
    with a pipeline (which saves its own), is refused rather than written into a misleading card."""
    from tiny_models import dit_pipeline

    from hf_collapse.hub import save_with_card

    pipe = dit_pipeline()
    collapsed, report = hf_collapse.collapse(
        pipe.transformer, {"transformer_blocks.0": 0.1}, num_units=1, latency_repeats=0, progress=False
    )
    pipe.transformer = collapsed
    card = model_card(pipe, report, repo_id="me/dit-small")
    assert card.data.library_name == "diffusers"
    assert (
        "A DiTPipeline whose `transformer` component, a DiTTransformer2DModel (dit family), has 1 block removed"
        in card.text
    )
    assert 'pipe = DiTPipeline.from_pretrained("me/dit-small")' in card.text and "AutoCollapsedModel" not in card.text
    _, other = hf_collapse.collapse(
        CASES_BY_NAME["bert"].build(), {"encoder.layer.0": 0.1}, num_units=1, latency_repeats=0, progress=False
    )
    with pytest.raises(ValueError, match="no collapsed component of that class"):
        model_card(pipe, other)
    with pytest.raises(ValueError, match="saves its own scheduler"):
        save_with_card(pipe, tmp_path, report, processor=pipe.scheduler)
    assert not any(tmp_path.iterdir())  # refused before anything was written

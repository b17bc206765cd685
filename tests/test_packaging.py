"""Packaging: the wheel ships the model card template; a plain (non-editable) install renders cards from anywhere;
``make test`` runs the suite against the installed package, as current as the source tree.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from tiny_models import CASES_BY_NAME

import hf_collapse
from hf_collapse import hub

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_IN_WHEEL = "hf_collapse/model_cards/collapsed_model.md"


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_wheel_ships_the_template_and_a_plain_install_renders_cards_outside_the_repo(tmp_path):
    # Build from a copy of what the package is made of: no build/ leftovers of the checkout get into the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "hf_collapse", source / "hf_collapse", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ]
    )
    (wheel,) = (tmp_path / "dist").glob("hf_collapse-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert TEMPLATE_IN_WHEEL in archive.namelist()
        assert archive.read(TEMPLATE_IN_WHEEL) == (ROOT / TEMPLATE_IN_WHEEL).read_bytes()

    # A throwaway environment: --system-site-packages, plus this interpreter's site-packages (where torch,
    # transformers... are) on its path, so the dependencies come along without the network; the package itself
    # comes from the wheel only (an editable install's finder in those site-packages is not activated).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    venv_python = venv / "bin" / "python"
    # The wheel first, while the environment sees no other hf_collapse (pip would take that one as installed).
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv_python),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--quiet",
            str(wheel),
        ]
    )
    venv_site = Path(
        _run(
            [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).stdout.strip()
    )
    assert (venv_site / TEMPLATE_IN_WHEEL).is_file()
    (venv_site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    script = textwrap.dedent("""
        import json
        import hf_collapse
        from hf_collapse import hub
        from transformers import BertConfig, BertForSequenceClassification
        model = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                                         num_attention_heads=4, intermediate_size=37))
        card = hub.model_card(hf_collapse.remove_blocks(model, ["encoder.layer.1"]), repo_id="me/tiny-collapsed")
        print(json.dumps({"package": hf_collapse.__file__, "template": str(hub.TEMPLATE), "card": str(card)}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    found = json.loads(
        _run([str(venv_python), "-c", script], cwd=outside, env={**env, "HF_HUB_OFFLINE": "1"})
        .stdout.strip()
        .splitlines()[-1]
    )
    assert Path(found["package"]).is_relative_to(venv) and not Path(found["package"]).is_relative_to(ROOT)
    assert Path(found["template"]).is_relative_to(venv)
    # Sections only the full template has (a stripped fallback had none of them).
    for section in ("## Compression", "## How to load it", "## Limitations", "me/tiny-collapsed"):
        assert section in found["card"], section


def test_a_missing_template_is_an_error_not_a_stripped_card(tmp_path, monkeypatch):
    model = hf_collapse.remove_blocks(CASES_BY_NAME["bert"].build(), ["encoder.layer.1"])
    assert "## Limitations" in str(hub.model_card(model))
    monkeypatch.setattr(hub, "TEMPLATE", tmp_path / "model_cards" / "collapsed_model.md")
    with pytest.raises(FileNotFoundError, match="template"):
        hub.model_card(model)


@pytest.mark.skipif(
    not os.environ.get("HF_COLLAPSE_TESTS_AGAINST_INSTALL"),
    reason="only under `make test`, which installs the package and runs the tests against that install",
)
def test_make_test_runs_against_the_current_installed_package():
    package = Path(hf_collapse.__file__).resolve().parent
    assert not package.is_relative_to(ROOT / "hf_collapse"), f"imported from the source tree: {package}"

    # The install is as current as the tree: same files, same bytes (the Makefile reinstalls on any change).
    def files(folder):
        return {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    assert files(package) == files(ROOT / "hf_collapse")
    # Subprocesses started by tests (python -m / -c from the tests' working directory) import it too.
    child = _run([sys.executable, "-c", "import hf_collapse; print(hf_collapse.__file__)"]).stdout.strip()
    assert Path(child).resolve().parent == package

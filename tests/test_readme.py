"""The README's code and the docstring examples run as written.

* Every ```python block of README.md, read from the README itself (so it cannot drift), runs in a fresh
  interpreter, in an empty temporary folder, with ``HF_HUB_OFFLINE=1``: it has to define or import everything it
  uses. A block that publishes (``push_to_hub``) runs against ``tests/local_hub.py``, the project's loopback Hub
  stand-in (``HF_ENDPOINT`` set to it, any token), and what it pushed must have arrived there. A block whose first
  line is ``# not run: <reason>`` cannot run here as written (it downloads from the Hub); such blocks are few and
  listed in :data:`EXEMPT_BLOCKS`, and each still runs with its download replaced by a tiny local stand-in.
* The docstring examples of every ``hf_collapse`` module run with :mod:`doctest`, except the modules listed in
  :data:`DOCTEST_NOT_RUN` with the reason (their examples continue a session that trained a model).
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The pages whose code blocks run: the README and every page of docs/.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run:"


def _tiny_dit_pipeline(folder: Path) -> str:
    from tiny_models import dit_pipeline

    dit_pipeline().save_pretrained(folder)
    return str(folder)


#: The blocks marked ``# not run:`` (a new marker fails the test until it is listed here): for each, the text of
#: the Hub id it downloads with ``from_pretrained`` and a function ``folder -> local path`` that saves a tiny model
#: of the same class to stand in for it.
EXEMPT_BLOCKS = {
    "docs/hub.md: Model cards and the Hub #2": ("facebook/DiT-XL-2-256", _tiny_dit_pipeline),
}
BLOCK_TIMEOUT_S = 300


def page_blocks(page: Path) -> list[tuple[str, str]]:
    """``(id, code)`` of each ```python block of ``page``, the id being the nearest heading above it and its rank
    there (``"docs/<page>: "`` before it for a docs page)."""
    blocks, heading, rank = [], "top", 0
    lines = page.read_text(encoding="utf-8").splitlines()
    prefix = "" if page == README else f"{page.relative_to(ROOT).as_posix()}: "
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading, rank = line.lstrip("#").strip(), 0
        elif line.strip() == "```python":
            end = next(j for j in range(index + 1, len(lines)) if lines[j].strip() == "```")
            rank += 1
            blocks.append((f"{prefix}{heading} #{rank}", "\n".join(lines[index + 1 : end]) + "\n"))
            index = end
        index += 1
    return blocks


BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def test_the_readme_has_its_snippets():
    ids = [block_id for block_id, _ in BLOCKS]
    for section in (
        "LaCoOT #1",
        "TLC #1",
        "TraDy #1",
        "Decoder LLMs #1",
        "docs/surgery.md: Depth surgery #1",
        "docs/surgery.md: LoRA and collapse #1",
        "docs/hub.md: Model cards and the Hub #1",
        "docs/lacoot.md: LaCoOT in any training loop #1",
        "docs/extending.md: Extending hf_collapse #1",
    ):
        assert section in ids, f"a page lost its ```python block under {section!r}: {ids}"


def test_the_readme_is_short_and_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"the README does not link {page.name}"
    for page in PAGES:  # every relative link of a page points at a file of the repository
        for target in re.findall(r"\]\((?!https?:)([^)#]+)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
    marked = {block_id for block_id, code in BLOCKS if code.startswith(NOT_RUN)}
    assert marked == set(EXEMPT_BLOCKS), f"blocks marked {NOT_RUN!r}: {sorted(marked)}, listed: {sorted(EXEMPT_BLOCKS)}"


def _run(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )


@pytest.mark.slow
@pytest.mark.parametrize("block_id, code", BLOCKS, ids=[block_id for block_id, _ in BLOCKS])
def test_readme_block_runs_as_written(block_id, code, tmp_path):
    compile(code, block_id, "exec")
    work = tmp_path / "work"
    work.mkdir()
    if code.startswith(NOT_RUN):  # the download, replaced by a tiny local model of the same class
        repo_id, stand_in = EXEMPT_BLOCKS[block_id]
        download = f'from_pretrained("{repo_id}")'
        assert code.count(download) == 1, f"{block_id} no longer calls {download}: update EXEMPT_BLOCKS"
        code = code.replace(download, f"from_pretrained({stand_in(tmp_path / 'stand_in')!r})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_TOKEN", None)
    env.pop("PYTHONPATH", None)  # as a user runs it: the installed hf_collapse, nothing from tests/
    started = time.perf_counter()
    if "push_to_hub(" in code:
        from local_hub import running_hub

        with running_hub(tmp_path / "hub") as endpoint:
            result = _run(code, work, {**env, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_local"})
        assert result.returncode == 0, f"block {block_id} failed:\n{code}\n{result.stderr[-6000:]}"
        for repo_id in re.findall(r'push_to_hub\([^,]+,\s*"([^"]+)"', code):
            pushed = tmp_path / "hub" / repo_id
            has_model = (pushed / "config.json").is_file() or (pushed / "model_index.json").is_file()  # or a pipeline
            assert (pushed / "README.md").is_file() and has_model, (
                f"{block_id}: nothing arrived at {repo_id}: {sorted(p.name for p in pushed.glob('*'))}"
            )
    else:
        result = _run(code, work, env)
        assert result.returncode == 0, f"block {block_id} failed:\n{code}\n{result.stderr[-6000:]}"
    print(f"{block_id}: {time.perf_counter() - started:.1f} s")


def test_example_text_task_is_small_reproducible_and_leaves_the_random_state_alone():
    import torch

    from hf_collapse.data import example_text_task

    state = torch.random.get_rng_state()
    task = example_text_task(train_size=16, test_size=8, max_length=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the head was seeded without touching the caller's RNG
    assert (len(task.train), len(task.test)) == (16, 8)
    assert task.model.config.num_labels == len(task.labels) == len(set(task.train.features["label"].names))
    again = example_text_task(train_size=16, test_size=8, max_length=16, seed=3)
    assert torch.equal(task.model.classifier.weight, again.model.classifier.weight)
    other = example_text_task(train_size=16, test_size=8, max_length=16, seed=4)
    assert not torch.equal(task.model.classifier.weight, other.model.classifier.weight)

    batch = task.collator([task.train[i] for i in range(8)])  # lines of different lengths, padded to one
    lengths = [len(task.train[i]["input_ids"]) for i in range(8)]
    assert len(set(lengths)) > 1 and batch["input_ids"].shape == (8, max(lengths)) and max(lengths) <= 16
    output = task.model(**batch)
    metrics = task.compute_metrics(
        type("Prediction", (), {"predictions": output.logits.detach().numpy(), "label_ids": batch["labels"].numpy()})()
    )
    assert 0.0 <= metrics["accuracy"] <= 1.0
    full = example_text_task(train_size=None, test_size=None, validation_size=None)
    assert (len(full.train), len(full.validation), len(full.test)) == (1174, 293, 366)
    with pytest.raises(ValueError, match="train_size"):
        example_text_task(train_size=0)


# ------------------------------------------------------------------------------------------------- doctest

#: Modules whose examples are not run, and why: they are fragments that continue a session (a model, a trainer,
#: scores or a report built before). Every other module of hf_collapse runs its examples; within those, an example
#: that cannot run carries ``# doctest: +SKIP`` and says why.
_CONTINUES = "its examples continue a session: they use {} built before"
DOCTEST_NOT_RUN = {
    "hf_collapse.architectures.base": _CONTINUES.format("a model, its adapter, blocks and activation sites"),
    "hf_collapse.healing": _CONTINUES.format("a teacher model, its collapsed student and their training data"),
    "hf_collapse.hub": _CONTINUES.format("a collapsed model, its report and a Hub repository"),
    "hf_collapse.lacoot.trainer": _CONTINUES.format("a model and a LaCoOTTrainer"),
    "hf_collapse.loading": _CONTINUES.format("a collapsed model saved in a folder or on the Hub"),
    "hf_collapse.removal": _CONTINUES.format("a model, block scores and an evaluation function"),
    "hf_collapse.engine.search": _CONTINUES.format("a model, a search strategy and a budget"),
    "hf_collapse.report": _CONTINUES.format("a model, block scores and the report of a collapse"),
    "hf_collapse.scoring.base": _CONTINUES.format("a UNet and its batch"),
    "hf_collapse.scoring.blocks": _CONTINUES.format("a model and a calibration loader"),
    "hf_collapse.scoring.loss": _CONTINUES.format("a decoder LM and a calibration loader"),
    "hf_collapse.surgery.blocks": _CONTINUES.format("a model and the result of a removal"),
    "hf_collapse.surgery.record": _CONTINUES.format("a model and the result of a removal"),
    "hf_collapse.surgery.sites": _CONTINUES.format("a model of a supported family"),
    "hf_collapse.surgery.linearize": _CONTINUES.format("a BERT model"),
    "hf_collapse.surgery.trial": _CONTINUES.format("a decoder LM and a batch"),
    "hf_collapse.evaluation": _CONTINUES.format("a model, training arguments, a dataset and a metric"),
    "hf_collapse.pipeline": _CONTINUES.format("a model, its calibration, validation and test data"),
    "hf_collapse.lm_evaluation": _CONTINUES.format("a causal LM, its tokenizer, held-out loaders and a report"),
    "hf_collapse.tlc.compress": _CONTINUES.format("a model, datasets, training arguments and a metric"),
    "hf_collapse.tlc.statistics": _CONTINUES.format("a model and calibration batches"),
    "hf_collapse.tlc.transforms": _CONTINUES.format("a model and its activation statistics"),
}


def _modules() -> list[str]:
    import hf_collapse

    return ["hf_collapse", *sorted(m.name for m in pkgutil.walk_packages(hf_collapse.__path__, "hf_collapse."))]


def _modules_with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    names = []
    for name in _modules():
        if name in DOCTEST_NOT_RUN or name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        if any(test.examples for test in finder.find(module)):
            names.append(name)
    return names


def test_doctest_exemptions_are_real_modules():
    assert set(DOCTEST_NOT_RUN) <= set(_modules()), sorted(set(DOCTEST_NOT_RUN) - set(_modules()))


@pytest.mark.slow
@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(module_name)
    results = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True, verbose=False
    )
    assert results.failed == 0, f"{results.failed} of the {results.attempted} examples of {module_name} failed"

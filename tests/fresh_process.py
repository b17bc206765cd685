"""Run a saved model's own model-card loading code in a fresh interpreter, the way a user does.

Nothing is imported beforehand: a registry that fills only when some module is imported (edit operations, peft method
types) is empty there, so a reload that works only because the test process imported that module fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: Where the card's loading code names the model's location when no Hub repository was given.
PLACEHOLDER = "path/to/this/folder"

#: Appended to the card's code: run the loaded ``model`` (or ``pipe``) on the saved inputs and save its output.
_EVALUATE = textwrap.dedent("""
    import sys as _sys
    import torch as _torch
    _check = _torch.load(_sys.argv[1] + "/fresh_check.pt")
    _loaded = [name for name in ("hf_collapse.tlc", "hf_collapse.trady") if name in _sys.modules]
    if "pipe" in globals():
        _images = pipe(class_labels=[1], num_inference_steps=2, generator=_torch.Generator().manual_seed(0),
                       output_type="np").images
        _out = _torch.from_numpy(_images)
    else:
        with _torch.no_grad():
            _result = model.eval()(**_check["inputs"])
        _out = next(_result.get(k) for k in ("logits", "sample", "last_hidden_state") if _result.get(k) is not None) \\
            if hasattr(_result, "get") else _result[0]
    _torch.save({"output": _out, "class": type(model if "model" in globals() else pipe).__name__,
                 "modules": _loaded}, _sys.argv[1] + "/fresh_output.pt")
""")


def card_code(folder: str | os.PathLike) -> str:
    """The ```python block of the card (``README.md``) saved in ``folder``, its placeholder replaced by the folder."""
    card = (Path(folder) / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    if len(blocks) != 1:
        raise AssertionError(f"the card in {folder} has {len(blocks)} python blocks, expected the one loading snippet")
    return blocks[0].replace(PLACEHOLDER, str(folder))


def run_card_code(folder: str | os.PathLike, inputs: dict | None) -> dict:
    """Run the card's code in a new interpreter, then the loaded model on ``inputs`` (a pipeline: two seeded DDIM
    steps); returns ``{"output": tensor, "class": loaded class name, "modules": hf_collapse method packages that
    ended up imported}``."""
    folder = Path(folder)
    torch.save({"inputs": inputs}, folder / "fresh_check.pt")
    script = card_code(folder) + "\n" + _EVALUATE
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=600, env=env, cwd=folder
    )
    if result.returncode != 0:
        raise AssertionError(f"the card's loading code failed in a fresh process:\n{script}\n{result.stderr[-3000:]}")
    return torch.load(folder / "fresh_output.pt")


def run_card_codes(jobs: dict[str, tuple[str | os.PathLike, dict | None]], workers: int = 2) -> dict[str, dict]:
    """:func:`run_card_code` for several folders, each in its own fresh interpreter, ``workers`` at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_card_code, folder, inputs) for name, (folder, inputs) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}

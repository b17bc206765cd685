"""GGUF: one file llama.cpp (and what runs on it: Ollama, LM Studio, llama-cpp-python) serves.

* A decoder that lost whole blocks is a plain checkpoint of its own family with fewer layers: llama.cpp's converter
  writes it under the family's own architecture (``llama`` for SmolLM2).
* A Llama that lost sub-layers (attention or MLP of some layers) is written in the DeciLM layout
  (:mod:`~hf_collapse.export.decilm`) and converted by llama.cpp's DeciLM converter: architecture ``deci``.

The model is converted to an f32 GGUF first and that file is checked against PyTorch in llama.cpp (f32 KV cache);
``quantize`` then derives the file to serve with llama.cpp's own quantizer (``f16`` by default; ``q8_0``,
``q4_k_m``, ...), and what quantization changes is measured on the same inputs (largest logit difference, next-token
agreement with PyTorch), not assumed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from ..architectures.base import is_causal_lm, unwrap_model
from ..surgery.record import collapse_record
from .base import ExportFormat, Runner, Served
from .decilm import check_decilm, layout_notes, write_decilm
from .llama_cpp import (
    GGUF_TYPES,
    convert,
    copy_tokenizer,
    llama_cpp_version,
    logits_runner,
    quantize,
    require_llama_cpp,
)

__all__ = ["GGUF"]

CHECKED = "model-f32.gguf"
#: The tokenizer files the converter reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _removes_sublayers(model: nn.Module) -> bool:
    record = collapse_record(model) or {}
    return any(edit.get("op") == "remove_sublayers" for edit in record.get("edits", []))


def _served_name(type_name: str) -> str:
    return f"model-{type_name}.gguf"


class GGUF(ExportFormat):
    """A GGUF file for llama.cpp: the family's own architecture after block removals, ``deci`` after sub-layer ones."""

    name = "gguf"
    description = "a GGUF file for llama.cpp / Ollama (decoders; --quantize f16, q8_0, q4_k_m, ...)"
    runtime = "llama.cpp"
    requirements = ("llama_cpp", "gguf")
    families = ("decoder",)
    needs_tokenizer = True
    options: ClassVar[Mapping[str, str]] = {"quantize": f"the served file's type: {', '.join(GGUF_TYPES)} (f16)"}

    def __init__(self, quantize: str = "f16"):
        if quantize not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {quantize!r} for quantize; accepted: {', '.join(GGUF_TYPES)}")
        self.quantize = quantize
        self._notes: list[str] = []

    def with_options(self, **options: Any) -> GGUF:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"the gguf export takes no option {unknown}; accepted: {', '.join(self.options)}")
        return GGUF(**options)

    def check(self, model: nn.Module) -> None:
        require_llama_cpp()
        if not is_causal_lm(model):
            raise ValueError(
                f"{type(model).__name__} is not a causal LM: GGUF export covers decoders (encoders and vision models "
                "export to ONNX: format='onnx')"
            )
        if _removes_sublayers(model):
            check_decilm(model)
            return
        record = collapse_record(model) or {}
        others = sorted({e.get("op") for e in record.get("edits", []) if e.get("op") != "remove_blocks"})
        if others:
            raise ValueError(
                f"{type(model).__name__} was edited by {', '.join(others)}: no llama.cpp architecture holds its fused "
                "linear maps. Block and sub-layer removals export to GGUF"
            )

    def write(self, model: nn.Module, output: Path, inputs: Mapping[str, Any]) -> list[Path]:
        self._notes = []
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            if _removes_sublayers(model):
                _, layout = write_decilm(model, folder)
                self._notes = [
                    "Written in the DeciLM layout (llama.cpp architecture `deci`): layers differ.",
                    *layout_notes(layout, getattr(unwrap_model(model).config, "intermediate_size", None)),
                ]
            else:
                unwrap_model(model).save_pretrained(folder)
            copy_tokenizer(output, folder, TOKENIZER_FILES)
            return [convert(folder, output / CHECKED, "f32")]

    def runner(self, output: Path, threads: int = 1) -> Runner:
        return logits_runner(output / CHECKED, threads=threads)

    def finish(self, output, files, feed, expected, threads) -> Served:
        notes = [*self._notes, "The f32 conversion was checked against PyTorch (f32 KV cache) before quantizing."]
        if self.quantize == "f32":
            return Served(self.runner(output, threads), files, self._notes)
        served = quantize(output / CHECKED, output / _served_name(self.quantize), self.quantize)
        run = logits_runner(served, threads=threads)
        logits, reference = run(feed)[0], expected[0]
        agreement = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        notes.append(
            f"{self.quantize}: largest logit difference from PyTorch {np.abs(logits - reference).max():.3g}, same "
            f"next-token choice at {agreement:.0%} of the checked positions; {served.stat().st_size / 2**20:.1f} MiB."
        )
        (output / CHECKED).unlink()
        return Served(run, [served], notes)

    def runtime_version(self) -> str:
        return f"llama.cpp (llama-cpp-python {llama_cpp_version()})"

    def how_to_run(self, output: Path, input_names: list[str]) -> str:
        file = _served_name(self.quantize)
        return "\n".join(
            [
                f'llama.cpp: `llama-cli -m {file} -p "The news today:" -n 64` (or `llama-server -m {file}`).',
                "",
                f"Ollama (a `llama`-architecture file): a `Modelfile` holding `FROM ./{file}`, then "
                "`ollama create my-model -f Modelfile && ollama run my-model`.",
                "",
                "Python, with llama-cpp-python:",
                "",
                "```python",
                "from llama_cpp import Llama",
                "",
                f'llm = Llama(model_path="{file}")',
                'print(llm("The news today:", max_tokens=64)["choices"][0]["text"])',
                "```",
            ]
        )

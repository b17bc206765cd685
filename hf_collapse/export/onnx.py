"""ONNX: a graph ONNX Runtime runs, with a dynamic batch (and sequence length, for text), for encoders and vision
models, TLC-fused ones included (a fused model is plain linear algebra to the exporter)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..architectures.base import is_causal_lm
from .base import ExportFormat, Runner

__all__ = ["ONNX"]

FILE = "model.onnx"


def _dynamic_shapes(inputs: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """Token inputs (integer, batch x sequence) vary in both; anything else (images, latents) in the batch only."""
    shapes = {}
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and not value.is_floating_point():
            shapes[name] = {0: "batch", 1: "sequence"}
        else:
            shapes[name] = {0: "batch"}
    return shapes


class ONNX(ExportFormat):
    name = "onnx"
    description = "an ONNX graph for ONNX Runtime (encoders and vision models; dynamic batch and sequence length)"
    runtime = "ONNX Runtime"
    requirements = ("onnx", "onnxscript", "onnxruntime")
    families = ("encoder", "vision")

    def check(self, model: nn.Module) -> None:
        missing = [name for name in self.requirements if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(
                f"the onnx export needs {', '.join(missing)}: pip install 'hf_collapse[export]' (or "
                f"pip install {' '.join(missing)})"
            )
        if is_causal_lm(model):
            raise ValueError(
                f"{type(model).__name__} is a causal LM: ONNX export here covers encoders and vision models, whose "
                "one forward pass is the whole job. A decoder is served with a KV cache by llama.cpp or vLLM; its "
                "pruned checkpoint reloads with plain from_pretrained for those runtimes' own converters."
            )

    def write(self, model: nn.Module, output: Path, inputs: Mapping[str, Any]) -> list[Path]:
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        program = torch.onnx.export(
            model, (), kwargs=tensors, dynamo=True, dynamic_shapes=_dynamic_shapes(tensors), verbose=False
        )
        path = output / FILE
        program.save(str(path))
        return [path]

    def runner(self, output: Path, threads: int = 1) -> Runner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(output / FILE), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            return session.run(None, {name: inputs[name] for name in names})

        return run

    def runtime_version(self) -> str:
        import onnxruntime as ort

        return f"ONNX Runtime {ort.__version__}"

    def how_to_run(self, output: Path, input_names: list[str]) -> str:
        feed = ", ".join(f'"{name}": {name}' for name in input_names)
        return "\n".join(
            [
                "```python",
                "import onnxruntime as ort",
                "",
                f'session = ort.InferenceSession("{FILE}", providers=["CPUExecutionProvider"])',
                f"outputs = session.run(None, {{{feed}}})  # numpy arrays; batch (and sequence) lengths are free",
                "```",
            ]
        )

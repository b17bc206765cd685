"""What an export format is (:class:`ExportFormat`) and the registry of them (:data:`EXPORTS`).

An export format writes a model where it will be served (a file or a folder a runtime reads), and runs what it wrote
in that runtime: :func:`hf_collapse.export.export` checks the runtime's outputs against the PyTorch model's on two
input shapes and times both. A new format is one file with one subclass and one registration
(``EXPORTS.register(MyFormat())``); :func:`~hf_collapse.export.export` and ``hf-collapse export --format`` then
offer it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..registry import Registry

__all__ = ["EXPORTS", "ExportFormat", "Runner"]

#: Runs the exported model in its runtime: named numpy inputs in, the outputs (in the model's order) out.
Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


class ExportFormat:
    """A way to export a model for a serving runtime.

    Attributes:
        name: what ``format=`` (and ``--format``) names it by.
        description: a few words for ``--help`` and errors.
        runtime: the runtime that reads it, as its users call it ("ONNX Runtime").
        requirements: the pip packages the format needs (named when one is missing).
        families: the kinds of model it exports, among ``"encoder"``, ``"vision"`` and ``"decoder"`` (the contract
            test exports a tiny model of each).
    """

    name: str = ""
    description: str = ""
    runtime: str = ""
    requirements: tuple[str, ...] = ()
    families: tuple[str, ...] = ()

    def check(self, model: nn.Module) -> None:
        """Refuse, before any work, a model this format cannot express (``ValueError`` saying why and what to do)."""

    def write(self, model: nn.Module, output: Path, inputs: Mapping[str, Any]) -> list[Path]:
        """Write ``model`` into the folder ``output`` (it exists); ``inputs``: example inputs of the model. Returns the
        files written."""
        raise NotImplementedError

    def runner(self, output: Path, threads: int = 1) -> Runner:
        """The exported model, run by the runtime itself on ``threads`` threads."""
        raise NotImplementedError

    def runtime_version(self) -> str:
        """The runtime's name and version, for reports."""
        return self.runtime

    def how_to_run(self, output: Path, input_names: list[str]) -> str:
        """Markdown: how to run the export in its runtime (for the exported folder's card)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


#: The formats of :func:`hf_collapse.export.export`.
EXPORTS: Registry[ExportFormat] = Registry(
    "export format", how="add one with hf_collapse.export.EXPORTS.register(<an ExportFormat>)"
)

"""What an export format is (:class:`ExportFormat`) and the registry of them (:data:`EXPORTS`).

An export format writes a model where it will be served (a file or a folder a runtime reads), and runs what it wrote
in that runtime: :func:`hf_collapse.export.export` checks the runtime's outputs against the PyTorch model's on two
input shapes and times both. A new format is one file with one subclass and one registration
(``EXPORTS.register(MyFormat())``); :func:`~hf_collapse.export.export` and ``hf-collapse export --format`` then
offer it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from ..registry import Registry

__all__ = ["EXPORTS", "ExportFormat", "Runner", "Served"]

#: Runs the exported model in its runtime: named numpy inputs in, the outputs (in the model's order) out.
Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass
class Served:
    """What is served once the written model passed its check (:meth:`ExportFormat.finish`).

    Attributes:
        runner: runs the file(s) to serve (timed by :func:`~hf_collapse.export.export`).
        files: the files the export leaves in its folder.
        notes: how what is served differs from what was checked (a quantized file: measured, not assumed).
    """

    runner: Runner
    files: list[Path]
    notes: list[str] = field(default_factory=list)


class ExportFormat:
    """A way to export a model for a serving runtime.

    Attributes:
        name: what ``format=`` (and ``--format``) names it by.
        description: a few words for ``--help`` and errors.
        runtime: the runtime that reads it, as its users call it ("ONNX Runtime").
        requirements: the pip packages the format needs (named when one is missing).
        families: the kinds of model it exports, among ``"encoder"``, ``"vision"`` and ``"decoder"`` (the contract
            test exports a tiny model of each).
        needs_tokenizer: whether it writes the tokenizer into the export (then a saved folder with one is needed,
            not a bare model).
        options: the options it takes (``export(..., quantize="q4_k_m")``), with a few words each.
    """

    name: str = ""
    description: str = ""
    runtime: str = ""
    requirements: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    needs_tokenizer: bool = False
    options: ClassVar[Mapping[str, str]] = {}

    def with_options(self, **options: Any) -> ExportFormat:
        """This format with ``options`` set (a format without options refuses any)."""
        if options:
            raise ValueError(f"the {self.name} export takes no option {sorted(options)}")
        return self

    def check(self, model: nn.Module) -> None:
        """Refuse, before any work, a model this format cannot express (``ValueError`` saying why and what to do)."""

    def write(self, model: nn.Module, output: Path, inputs: Mapping[str, Any]) -> list[Path]:
        """Write ``model`` into the folder ``output`` (it exists); ``inputs``: example inputs of the model. Returns the
        files written."""
        raise NotImplementedError

    def runner(self, output: Path, threads: int = 1) -> Runner:
        """The exported model, run by the runtime itself on ``threads`` threads."""
        raise NotImplementedError

    def finish(
        self, output: Path, files: list[Path], feed: Mapping[str, np.ndarray], expected: list[np.ndarray], threads: int
    ) -> Served:
        """After the written model matched PyTorch's outputs ``expected`` on ``feed``: derive what is served (a
        quantized file, say) and measure how it differs. By default what was checked is served."""
        return Served(self.runner(output, threads=threads), files)

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

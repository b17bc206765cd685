"""Exporting a (collapsed) model to where it will be served, checked and timed by the runtime itself.

:func:`export` writes the model in a registered format (:data:`EXPORTS`; built in: ``"onnx"`` for ONNX Runtime,
``"gguf"`` for llama.cpp / Ollama, ``"decilm"``: the DeciLM layout vLLM, SGLang and mlx-lm read),
runs what it wrote in that runtime on two input shapes and compares every output with the PyTorch model's (a
mismatch is refused, not written down), times the runtime against eager PyTorch and, given the uncompressed
``reference``, the reference exported the same way: the speed-up in the runtime the model will be served in. The
folder gets a card saying how to run it there and what was measured, and ``export_report.json``.

Example::

    >>> import hf_collapse
    >>> report = hf_collapse.export.export("outputs/lacoot/collapsed", "outputs/onnx", format="onnx",
    ...                                     reference="minilm")                                   # doctest: +SKIP
    >>> report.max_abs_difference, report.speedup                                                 # doctest: +SKIP
    (2.1e-06, 1.31)
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..architectures.base import unwrap_model
from ..metrics import example_inputs
from .base import EXPORTS, ExportFormat, Runner, Served
from .decilm import DeciLM
from .gguf import GGUF
from .onnx import ONNX

__all__ = ["EXPORTS", "ExportFormat", "ExportReport", "Runner", "Served", "export"]

EXPORTS.register(ONNX())
EXPORTS.register(GGUF())
EXPORTS.register(DeciLM())

#: Files of a model folder that travel with an export (what a user needs beside the graph: config, tokenizer,
#: image processor).
COMPANION_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
)


@dataclass
class ExportReport:
    """What :func:`export` wrote, checked and measured.

    Attributes:
        format: the format's name.
        runtime: the runtime and its version.
        files: the files written (the card and the report included).
        shapes: the input shapes checked (``{input: shape}`` per check).
        max_abs_difference: the largest absolute difference between the runtime's and PyTorch's outputs.
        tolerance: the largest difference accepted (relative to the outputs' scale).
        threads: the runtime's threads when timed.
        runtime_ms: median latency in the runtime on the first shape.
        eager_ms: median latency of eager PyTorch on the same inputs (same machine, same thread count).
        reference_runtime_ms: the reference model's median latency in the runtime, when a reference was given.
        speedup: ``reference_runtime_ms / runtime_ms``.
        source: what was exported (a folder, a repository id or a model class).
        notes: what the format measured besides (a quantized file's differences, layout changes).
        inputs: what the check fed the model: text tokenized by its tokenizer (a folder saved with one), or random
            inputs of its shapes.
    """

    format: str
    runtime: str
    files: list[str]
    shapes: list[dict[str, list[int]]]
    max_abs_difference: float
    tolerance: float
    threads: int
    runtime_ms: float
    eager_ms: float
    reference_runtime_ms: float | None = None
    speedup: float | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    inputs: str = "random inputs"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load(model_or_folder: nn.Module | str | Path) -> tuple[nn.Module, str, Path | None]:
    if isinstance(model_or_folder, nn.Module):
        return unwrap_model(model_or_folder).eval(), type(model_or_folder).__name__, None
    from ..data.tasks import model_source
    from ..loading import AutoCollapsedModel

    source = model_source(str(model_or_folder))
    model = AutoCollapsedModel.from_pretrained(source).eval()
    return model, str(model_or_folder), Path(source) if Path(source).is_dir() else None


def _numpy(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _flat_outputs(outputs: Any) -> list[np.ndarray]:
    values = outputs.to_tuple() if hasattr(outputs, "to_tuple") else outputs
    if isinstance(values, torch.Tensor):
        values = (values,)
    flat: list[np.ndarray] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            flat.append(value.detach().cpu().numpy())
        elif isinstance(value, (tuple, list)):
            flat.extend(_flat_outputs(value))
    return flat


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


#: What the check feeds a text model whose folder has a tokenizer: real text, as served. (Random token ids drive a
#: decoder into states no text reaches: SmolLM2's logits then differ between two correct f32 runtimes by 4e-4 of their
#: scale, against 1e-6 on text.)
CHECK_TEXT = (
    "The committee met on Tuesday to discuss the new budget for the city's schools and libraries. Several members "
    "argued that the money should go first to repairs, while others wanted more teachers in the classrooms. After "
    "two hours of debate they agreed to publish a report next month, and the mayor said she would read it carefully "
    "before making any decision. Meanwhile, parents gathered outside the town hall with signs asking for smaller "
    "classes, longer library hours and safer roads near the schools."
)


def _check_inputs(model: nn.Module, folder: Path | None, batch_size: int, seq_len: int) -> tuple[dict[str, Any], str]:
    """Example inputs of the model's shapes; for a text model saved with its tokenizer, its tokens are real text."""
    inputs = example_inputs(model, batch_size=batch_size, seq_len=seq_len)
    ids = inputs.get("input_ids")
    if ids is None or not _tokenizer_files(folder):
        return inputs, "random inputs"
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder)(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    length = ids.shape[1]
    if len(tokens) < length + 8 * ids.shape[0] or max(tokens) >= _vocab_size(model):
        return inputs, "random inputs"
    rows = [tokens[8 * row : 8 * row + length] for row in range(ids.shape[0])]
    return {**inputs, "input_ids": torch.tensor(rows, dtype=ids.dtype)}, "text tokenized by the model's tokenizer"


def _vocab_size(model: nn.Module) -> int:
    config = getattr(unwrap_model(model), "config", None)
    return int(getattr(config, "vocab_size", 0) or 0)


def _second_shape(model: nn.Module, inputs: Mapping[str, Any], batch_size: int, seq_len: int, folder: Path | None):
    """Inputs of another batch size (and sequence length, for text): the export must not have fixed them."""
    token_inputs = any(isinstance(v, torch.Tensor) and not v.is_floating_point() for v in inputs.values())
    return _check_inputs(model, folder, batch_size + 1, seq_len + 5 if token_inputs else seq_len)[0]


def _card(fmt: ExportFormat, report: ExportReport, output: Path, input_names: list[str]) -> str:
    shapes = " and ".join(", ".join(f"{k} {tuple(v)}" for k, v in shape.items()) for shape in report.shapes)
    lines = [
        "---",
        "tags:",
        f"- {fmt.name}",
        "- hf-collapse",
        "---",
        "",
        f"# {report.source}, exported for {fmt.runtime}",
        "",
        f"Exported by hf_collapse (`hf_collapse.export.export(..., format={fmt.name!r})`) from `{report.source}`.",
        "",
        f"## Run it with {fmt.runtime}",
        "",
        fmt.how_to_run(output, input_names),
        "",
        f"## Checked and measured in {report.runtime}",
        "",
        f"* Outputs against the PyTorch model's on {shapes} ({report.inputs}): largest absolute difference "
        f"{report.max_abs_difference:.3g} (accepted up to {report.tolerance:.3g}).",
        f"* Median latency on the first shape, {report.threads} thread(s): {report.runtime_ms:.2f} ms in "
        f"{fmt.runtime}, {report.eager_ms:.2f} ms in eager PyTorch on the same machine.",
    ]
    if report.speedup is not None:
        lines.append(
            f"* The uncompressed reference exported the same way: {report.reference_runtime_ms:.2f} ms, so this model "
            f"runs {report.speedup:.2f}x faster in {fmt.runtime}."
        )
    lines.extend(f"* {note}" for note in report.notes)
    return "\n".join(lines) + "\n"


def _tokenizer_files(folder: Path | None) -> list[str]:
    return [n for n in COMPANION_FILES if n != "config.json" and folder is not None and (folder / n).is_file()]


def _check(model: nn.Module, runner: Runner, checks: list[dict[str, Any]], runtime: str):
    """The runtime's outputs against PyTorch's on each of ``checks``: (shapes, worst difference, tolerance, the
    first check's PyTorch outputs). A difference beyond 1e-4 of the outputs' scale is refused."""
    shapes, worst, tolerance, first = [], 0.0, 0.0, None
    for check in checks:
        with torch.no_grad():
            expected = _flat_outputs(model(**check))
        first = expected if first is None else first
        got = runner(_numpy(check))
        if len(got) < 1 or got[0].shape != expected[0].shape:
            raise ValueError(
                f"{runtime} returned {[g.shape for g in got]} where PyTorch returns "
                f"{[e.shape for e in expected]}: the export is wrong, refusing it"
            )
        pairs = [(g, e) for g, e in zip(got, expected) if g.shape == e.shape]
        scale = max(float(np.abs(e).max()) for _, e in pairs) or 1.0
        tolerance = max(tolerance, 1e-4 * scale)
        difference = max(float(np.abs(g - e).max()) for g, e in pairs)
        worst = max(worst, difference)
        shapes.append({k: list(v.shape) for k, v in check.items() if isinstance(v, torch.Tensor)})
        if difference > 1e-4 * scale:
            raise ValueError(
                f"{runtime}'s outputs differ from PyTorch's by {difference:.3g} on {shapes[-1]} (outputs of scale "
                f"{scale:.3g}): the export is wrong, refusing it"
            )
    return shapes, worst, tolerance, first


def export(
    model_or_folder: nn.Module | str | Path,
    output: str | Path,
    format: str = "onnx",
    *,
    reference: nn.Module | str | Path | None = None,
    batch_size: int = 2,
    seq_len: int = 16,
    threads: int = 1,
    repeats: int = 20,
    **options: Any,
) -> ExportReport:
    """Export ``model_or_folder`` for a serving runtime, check it there and time it.

    Args:
        model_or_folder: a model, a saved folder (collapsed or not: loaded with
            :class:`~hf_collapse.AutoCollapsedModel`), an embedded model name or a Hub repository id.
        output: the folder to write (created; files of the same names are replaced).
        format: a registered format (:data:`EXPORTS`).
        reference: the uncompressed model, exported the same way (in a temporary folder) and timed in the runtime:
            the report's ``speedup``.
        batch_size: the batch of the example inputs (a second check uses one more, and 5 more tokens for text).
        seq_len: tokens of the example text inputs.
        threads: the runtime's threads when timing (PyTorch's are set the same for the eager time).
        repeats: timed runs (the median is reported).
        **options: the format's own options (its ``options``: ``quantize="q4_k_m"`` for ``"gguf"``).

    Returns:
        An :class:`ExportReport` (also saved as ``export_report.json``, beside the card ``README.md``).

    Raises:
        ValueError: an unknown format or option, a model the format cannot express, a missing runtime, or outputs
            that differ from PyTorch's beyond the tolerance (nothing is left claiming otherwise: the card is not
            written).
    """
    fmt = EXPORTS.get(format).with_options(**options)
    model, source, folder = _load(model_or_folder)
    fmt.check(model)
    if fmt.needs_tokenizer and not _tokenizer_files(folder):
        raise ValueError(
            f"the {fmt.name} export writes the tokenizer too: give the saved folder that holds it "
            f"(model.save_pretrained(folder); tokenizer.save_pretrained(folder)), not {source}"
        )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    companions = []
    if folder is not None:  # first: a format that needs the tokenizer reads it from the export's folder
        for name in COMPANION_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, output / name)
                companions.append(output / name)
    inputs, kind = _check_inputs(model, folder, batch_size, seq_len)
    files = fmt.write(model, output, inputs)
    checks = [inputs, _second_shape(model, inputs, batch_size, seq_len, folder)]
    shapes, worst, tolerance, expected = _check(model, fmt.runner(output, threads=threads), checks, fmt.runtime)
    feed = _numpy(inputs)
    served = fmt.finish(output, files, feed, expected, threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        runtime_ms = _median_ms(lambda: served.runner(feed), repeats)
        with torch.no_grad():
            eager_ms = _median_ms(lambda: model(**inputs), repeats)
    finally:
        torch.set_num_threads(previous_threads)
    report = ExportReport(
        format=fmt.name,
        runtime=fmt.runtime_version(),
        files=[str(f) for f in [*served.files, *companions]],
        shapes=shapes,
        max_abs_difference=worst,
        tolerance=tolerance,
        threads=int(threads),
        runtime_ms=runtime_ms,
        eager_ms=eager_ms,
        source=source,
        notes=list(served.notes),
        inputs=kind,
    )
    if reference is not None:
        report.reference_runtime_ms = _reference_ms(fmt, reference, batch_size, seq_len, threads, repeats)
        report.speedup = report.reference_runtime_ms / runtime_ms
    card, record = output / "README.md", output / "export_report.json"
    report.files.extend([str(card), str(record)])
    card.write_text(_card(fmt, report, output, list(feed)))
    record.write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _reference_ms(fmt: ExportFormat, reference, batch_size: int, seq_len: int, threads: int, repeats: int) -> float:
    """The uncompressed reference, exported the same way in a scratch folder, timed in the runtime."""
    reference_model, _, reference_folder = _load(reference)
    fmt.check(reference_model)
    reference_inputs = example_inputs(reference_model, batch_size=batch_size, seq_len=seq_len)
    reference_feed = _numpy(reference_inputs)
    with torch.no_grad():
        expected = _flat_outputs(reference_model(**reference_inputs))
    with tempfile.TemporaryDirectory() as scratch:
        for name in _tokenizer_files(reference_folder):
            shutil.copy2(reference_folder / name, Path(scratch) / name)
        files = fmt.write(reference_model, Path(scratch), reference_inputs)
        served = fmt.finish(Path(scratch), files, reference_feed, expected, threads)
        return _median_ms(lambda: served.runner(reference_feed), repeats)

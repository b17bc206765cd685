"""``hf-collapse export``: a (collapsed) model written for a serving runtime, checked and timed in that runtime.

The formats, their choices and their ``--help`` come from the registry (:data:`hf_collapse.export.EXPORTS`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["DESCRIPTION", "build_parser", "main"]

DESCRIPTION = "Write a model for a serving runtime, check its outputs there against PyTorch's, and time it."


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``hf-collapse export``."""
    from ..export import EXPORTS
    from .arguments import CommandParser

    parser = CommandParser(prog="hf-collapse export", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("model", help="a saved model folder (collapsed or not), a Hub repo id, or an embedded model")
    parser.add_argument(
        "--format",
        default="onnx",
        choices=EXPORTS.names(),
        help="; ".join(f"{f.name} ({f.description})" for f in EXPORTS.entries()),
    )
    parser.add_argument("--output", required=True, help="the folder to write (the export, its card and its report)")
    parser.add_argument(
        "--reference", default=None, help="the uncompressed model, exported the same way to time the speed-up there"
    )
    parser.add_argument("--batch_size", type=int, default=2, help="batch of the example inputs")
    parser.add_argument("--max_length", type=int, default=16, help="tokens of the example text inputs")
    parser.add_argument("--threads", type=int, default=1, help="threads of the runtime (and of PyTorch) when timing")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs (the median is reported)")
    for option in _format_options():
        takers = [f"{f.name}: {f.options[option]}" for f in EXPORTS.entries() if option in f.options]
        parser.add_argument(f"--{option}", default=None, help="; ".join(takers))
    return parser


def _format_options() -> list[str]:
    """The options the registered formats take (each a flag; given only to the format that takes it)."""
    from ..export import EXPORTS

    return sorted({option for fmt in EXPORTS.entries() for option in fmt.options})


def main(argv: Sequence[str]) -> int:
    """``hf-collapse export MODEL --output DIR [--format onnx] [--reference ORIGINAL]``."""
    from ..export import export
    from .arguments import at_least

    args = build_parser().parse_args(list(argv))
    for name in ("batch_size", "max_length", "threads", "repeats"):
        at_least(name, getattr(args, name), 1)
    report = export(
        args.model,
        args.output,
        format=args.format,
        reference=args.reference,
        batch_size=args.batch_size,
        seq_len=args.max_length,
        threads=args.threads,
        repeats=args.repeats,
        **{option: getattr(args, option) for option in _format_options() if getattr(args, option) is not None},
    )
    print(
        f"{report.format}: {args.output} ({report.runtime}); outputs within {report.max_abs_difference:.2g} of "
        f"PyTorch's on {len(report.shapes)} shapes; {report.runtime_ms:.2f} ms per batch there "
        f"({report.threads} thread(s)), eager PyTorch {report.eager_ms:.2f} ms"
        + (f"; {report.speedup:.2f}x faster than the reference there" if report.speedup is not None else "")
    )
    for note in report.notes:
        print(note)
    return 0

"""The ``hf-collapse`` command: one module per sub-command, and what they share.

* :mod:`~hf_collapse.commands.inspect`: a model's blocks and their share of parameters and FLOPs;
* :mod:`~hf_collapse.commands.lacoot`: LaCoOT end to end (train with the penalty, collapse, save);
* :mod:`~hf_collapse.commands.tlc`: TLC end to end (fine-tune, collapse activation layers, save);
* :mod:`~hf_collapse.commands.prune`: depth compression of a causal LM (score, remove, heal, measure, save, push);
* :mod:`~hf_collapse.commands.trady`: memory-budgeted fine-tuning with TraDy and its memory report;
* :mod:`~hf_collapse.commands.export`: a model written for a serving runtime, checked and timed there;
* :mod:`~hf_collapse.commands.arguments` / :mod:`~hf_collapse.commands.output`: shared flags and printing.

Mistakes get one line, ``hf-collapse: error: ...`` naming what was wrong and what is accepted, and exit code 2;
``--debug`` (anywhere on the command line) shows the traceback instead. The heavy libraries are imported by the
command that needs them, so that ``hf-collapse --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .arguments import CommandParser, UsageError

# OpenMP threads that spin while they wait turn every other process on a shared machine into a 10-40x slowdown
# of each forward pass (measured: MiniLM 45 ms alone, 900 ms beside one busy process), which ruins training time and
# latency measurements alike. It must be set before torch loads OpenMP: the command sets it (unless the user did)
# before importing anything heavy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

#: The job commands (their own flag parsers: the job's flags and ``TrainingArguments``'), by module, with their help.
COMMANDS = {
    "lacoot": "LaCoOT end to end: fine-tune with the MSW penalty, collapse blocks under a metric budget, save",
    "tlc": "TLC end to end: fine-tune, collapse activation layers and fuse the linear maps, save",
    "prune": "depth compression of a causal LM: score, remove under a block count or perplexity budget, heal, "
    "measure perplexity and tokens/s, save (and push)",
    "trady": "memory-budgeted fine-tuning with TraDy: calibrate, train the sampled channels, measure the peak memory "
    "of a training step against full fine-tuning, save the adapter (and the merged model)",
    "export": "write a model for a serving runtime (ONNX Runtime), check its outputs there and time it",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``inspect`` with its flags, and the job commands by name."""
    from . import inspect

    parser = CommandParser(
        prog="hf-collapse",
        description="Make Hugging Face models shallower.",
        epilog="--debug anywhere shows the traceback of an error.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    inspect.add_parser(commands)
    for name, text in COMMANDS.items():
        commands.add_parser(name, add_help=False, help=f"{text} (see `{name} --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-collapse``; returns the exit code (0, or 2 on a mistake, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] and argv[0] in COMMANDS:
            return importlib.import_module(f"{__name__}.{argv[0]}").main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except KeyboardInterrupt:
        print("hf-collapse: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure gets one line; --debug shows the traceback
        if debug:
            raise
        logging.getLogger(__name__).debug("hf-collapse failed", exc_info=True)
        expected = isinstance(error, (ValueError, FileNotFoundError))  # a mistake: the message says it all
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not expected:
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"hf-collapse: error: {message}", file=sys.stderr)
        return 2

"""What every command shares: the task flags, the flag parser (one-line usage errors, deprecated spellings), and the
seeding before a model is built."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import compat
from ..data import DATA_FILE_SUFFIXES, EMBEDDED_DATASETS, EMBEDDED_MODELS, check_source
from ..data.tasks import TASKS
from ..deprecation import VOCABULARY

__all__ = [
    "DEPRECATED_FLAGS",
    "CommandParser",
    "JobArguments",
    "LMJobArguments",
    "UsageError",
    "at_least",
    "parse_job_flags",
    "seed_everything",
]


class UsageError(ValueError):
    """A mistake on the command line (exit code 2, one line)."""


class CommandParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose mistakes are :class:`UsageError` (one line, exit code 2), naming the ``--help``."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def at_least(name: str, value: float | None, low: float) -> None:
    """Refuse ``--name value`` below ``low`` (``None``: not given, accepted)."""
    if value is not None and value < low:
        raise ValueError(f"--{name} must be >= {low:g}, got {value:g}")


def seed_everything(args) -> None:
    """Seed before the model is built: a new classification head is initialised from the global generator, before
    the Trainer seeds anything (two runs with the same seed drew different heads, then trained apart)."""
    from transformers import enable_full_determinism, set_seed

    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)


def check_dataset(dataset: str, flag: str | None = None) -> None:
    """Refuse a dataset argument that names nothing usable (an unknown embedded name, a missing or non-data file); the
    message starts with ``flag`` when given (a flag other than ``--dataset``)."""
    try:
        check_source(
            "dataset", dataset, list(EMBEDDED_DATASETS), f"a data file or folder ({', '.join(DATA_FILE_SUFFIXES)})"
        )
        path = Path(dataset)
        if path.is_file() and path.suffix not in DATA_FILE_SUFFIXES:
            raise ValueError(f"dataset file {dataset!r} is not a data file: accepted {', '.join(DATA_FILE_SUFFIXES)}")
    except ValueError as error:
        if flag is None:
            raise
        raise ValueError(f"{flag}: {error}") from None


def _check_model_and_dataset(model: str, dataset: str) -> None:
    check_source("model", model, list(EMBEDDED_MODELS), "a saved model folder")
    check_dataset(dataset)


@dataclass
class JobArguments:
    """The task: which model and which data (flags shared by ``hf-collapse lacoot`` and ``hf-collapse tlc``)."""

    model: str = field(default="minilm", metadata={"help": "Embedded model name, local folder or Hub model id."})
    dataset: str = field(
        default="dialog_topics",
        metadata={
            "help": f"Embedded dataset ({', '.join(EMBEDDED_DATASETS)}), a local data file/folder "
            "(json, csv, parquet) or a Hub dataset name."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column (text datasets)."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    max_length: int = field(
        default=64, metadata={"help": "Maximum tokens per text example (causal_lm: tokens per window of text)."}
    )
    task: str = field(
        default="auto",
        metadata={
            "help": "classification (a head on labelled data, accuracy) or causal_lm (next-token prediction on the "
            "text cut into windows, perplexity); auto: causal_lm when the model is a causal LM."
        },
    )
    eval_windows: int = field(default=64, metadata={"help": "causal_lm: held-out windows for perplexity."})
    train_windows: int | None = field(
        default=None,
        metadata={"help": "causal_lm: at most this many training windows (default: all of the training text)."},
    )
    latency_repeats: int = field(
        default=10, metadata={"help": "Interleaved rounds timing each state beside the original (0: no latency)."}
    )

    def __post_init__(self):
        # Checked at parse time: a bad value fails in seconds, not after the training.
        _check_model_and_dataset(self.model, self.dataset)
        at_least("max_length", self.max_length, 1)
        at_least("latency_repeats", self.latency_repeats, 0)
        at_least("eval_windows", self.eval_windows, 1)
        at_least("train_windows", self.train_windows, 1)
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")

    def task_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`hf_collapse.data.prepare_task` these flags give."""
        return dict(
            text_column=self.text_column,
            label_column=self.label_column,
            max_length=self.max_length,
            eval_windows=self.eval_windows,
            train_windows=self.train_windows,
        )


@dataclass
class LMJobArguments:
    """The model and the text of the causal-LM commands (``hf-collapse prune``, ``hf-collapse trady``)."""

    model: str = field(default="smollm2", metadata={"help": "Embedded model name, local folder or Hub model id."})
    dataset: str = field(
        default="bbc_news",
        metadata={
            "help": f"Embedded dataset ({', '.join(EMBEDDED_DATASETS)}), a local text file/folder "
            f"({', '.join(DATA_FILE_SUFFIXES)}) or a Hub dataset name."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column."})

    def __post_init__(self):
        _check_model_and_dataset(self.model, self.dataset)


#: Flags of earlier versions and what they are now: accepted for one release, with a warning.
DEPRECATED_FLAGS = {
    "--num_blocks": "--num_units",
    "--target_layers": "--num_units",
    "--max_metric_drop": "--max_metric_delta",
    "--max_metric_increase": "--max_metric_delta",
    "--window": "--max_length",
}


def rename_deprecated_flags(argv: Sequence[str], accepted: set[str]) -> list[str]:
    """``argv`` with the deprecated flags this command accepts under their new names (a ``FutureWarning`` each)."""
    renamed = []
    for argument in argv:
        flag, equals, value = argument.partition("=")
        new = DEPRECATED_FLAGS.get(flag)
        if new is not None and new in accepted:
            warnings.warn(
                f"{flag} is deprecated and will be removed in the next release; use {new} ({VOCABULARY})",
                FutureWarning,
                stacklevel=2,
            )
            argument = new + equals + value
        renamed.append(argument)
    return renamed


def healing_help() -> str:
    """The ``--heal`` help: the registered healing methods (:data:`hf_collapse.healing.HEALING`)."""
    from ..healing import HEALING

    return f"Heal the collapsed model: {HEALING.describe()}."


def check_healing(method: str | None) -> None:
    """Refuse an unknown ``--heal`` before any work, naming the registered methods."""
    from ..healing import HEALING

    if method is not None and method not in HEALING:
        raise ValueError(f"--heal {method!r}: expected one of {', '.join(HEALING)}")


def unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """The one-line error for unknown flags, with the closest known flag suggested."""
    flags = [a for a in unknown if a.startswith("-")] or unknown
    known = [o for o in compat.parser_option_strings(parser) if o.startswith("--")]
    close = difflib.get_close_matches(flags[0].split("=")[0], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; see `{parser.prog} --help`"
    return f"unrecognized arguments: {' '.join(unknown)}{hint}"


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


@contextlib.contextmanager
def _named_as_flags(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A refusal that starts with a field's name (``num_units must be ...``, as the library words it) names it as the
    flag the user typed (``--num_units must be ...``)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if f"--{message.split(' ', 1)[0]}" in compat.parser_option_strings(parser):
            raise ValueError(f"--{message}") from None
        raise


def parse_job_flags(
    prog: str,
    description: str,
    job_class: type,
    args_class: type,
    defaults: dict[str, Any],
    argv: Sequence[str],
    defaults_for_job: Callable[[Any], dict[str, Any]] | None = None,
):
    """``(job, training_args)`` of a job command, parsed by ``HfArgumentParser`` with ``defaults``; every mistake is a
    :class:`UsageError`. With ``defaults_for_job``, the training defaults depend on the job flags, which are read
    first. Deprecated flags (:data:`DEPRECATED_FLAGS`) are accepted under their new names, with a warning. Without
    an accelerator, ``--dataloader_pin_memory`` defaults to false (pinned memory only speeds up copies to a device,
    and torch warns at every data loader that it is unused)."""
    import dataclasses

    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):
            raise UsageError(message)

    parser = Parser((job_class, args_class), prog=prog, description=description, allow_abbrev=False)
    for action in compat.parser_actions(parser):
        # a field whose metadata["help"] is a function: its help is built now, from a registry (an entry registered
        # by the user's own code is listed too), e.g. healing_help
        if callable(action.help):
            action.help = action.help()
    argv = rename_deprecated_flags(argv, set(compat.parser_option_strings(parser)))
    if defaults_for_job is not None and not {"-h", "--help"} & set(argv):
        with _named_as_flags(parser):
            job_only, _ = Parser(job_class, allow_abbrev=False).parse_args_into_dataclasses(
                list(argv), return_remaining_strings=True
            )
        defaults = defaults_for_job(job_only)
    if not _has_accelerator() and "dataloader_pin_memory" in {f.name for f in dataclasses.fields(args_class)}:
        defaults = {"dataloader_pin_memory": False, **defaults}
    parser.set_defaults(**defaults)
    with _named_as_flags(parser):
        job, args, unknown = parser.parse_args_into_dataclasses(list(argv), return_remaining_strings=True)
    if unknown:
        raise UsageError(unknown_flags_message(parser, unknown))
    return job, args

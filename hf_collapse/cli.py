"""The ``hf-collapse`` command.

Mistakes get one line, ``hf-collapse: error: ...`` naming what was wrong and what is accepted, and exit code 2;
``--debug`` (anywhere on the command line) shows the traceback instead. The heavy libraries are imported by the
command that needs them, so that ``hf-collapse --help`` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Any, Callable, Sequence

# OpenMP threads that spin while they wait turn every other process on a shared machine into a 10-40x slowdown
# of each forward pass (measured: MiniLM 45 ms alone, 900 ms beside one busy process), which ruins training time and
# latency measurements alike. It must be set before torch loads OpenMP: the command sets it (unless the user did)
# before importing anything heavy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_model(name_or_path: str):
    """A model from a folder, an embedded short name (``minilm``) or a Hub repository id."""
    from .data import EMBEDDED_MODELS, check_source, embedded_model_path, is_embedded
    from .loading import AutoCollapsedModel

    check_source("model", name_or_path, list(EMBEDDED_MODELS), "a saved model folder")
    source = embedded_model_path(name_or_path) if is_embedded(name_or_path) else name_or_path
    return AutoCollapsedModel.from_pretrained(source).eval()


def inspect_command(args: argparse.Namespace) -> int:
    from .architectures.base import adapter_for
    from .metrics import count_parameters, example_inputs, module_flops
    from .report import format_count
    from .surgery import collapse_record, find_blocks

    model = load_model(args.model)
    adapter = adapter_for(model)
    blocks = find_blocks(model)
    inputs = example_inputs(model, batch_size=1, seq_len=args.seq_len)
    paths = [p for b in blocks for p in (b.path, *b.extra_paths)]
    total_flops, flops = module_flops(model, inputs, paths)
    total_params = count_parameters(model)

    record = collapse_record(model)
    print(f"model:  {args.model}")
    print(f"class:  {type(model).__name__}    family: {adapter.family} ({adapter.description})")
    print(f"params: {format_count(total_params)}    forward FLOPs: {format_count(total_flops)} "
          f"(batch 1, inputs: {', '.join(f'{k}{tuple(v.shape)}' for k, v in inputs.items() if hasattr(v, 'shape'))})")
    if record:
        removed = sum(len(e["blocks"]) for e in record["edits"] if e["op"] == "remove_blocks")
        linearized = sum(e["op"] == "linearize" for e in record["edits"])
        print(f"collapsed by hf_collapse: {removed} block(s) removed, {linearized} activation layer(s) linearized; "
              f"plain from_pretrained exact: {record['plain_reload_exact']}")
    print()
    header = f"{'block':<40} {'stage':>5} {'index':>5} {'params':>9} {'params%':>8} {'FLOPs%':>7}  removable"
    print(header)
    print("-" * len(header))
    for block in blocks:
        block_flops = sum(flops[p] for p in (block.path, *block.extra_paths))
        removable = "yes" if block.removable else f"no: {block.reason}"
        print(f"{block.name:<40} {block.stage:>5} {block.index:>5} {format_count(block.params):>9} "
              f"{100 * block.params / total_params:>7.1f}% {100 * block_flops / max(total_flops, 1):>6.1f}%  {removable}")
    print(f"\n{len(blocks)} blocks, {sum(b.removable for b in blocks)} removable")
    return 0


def _parse_job_flags(method: str, job_class: type, args_class: type, defaults: dict[str, Any],
                     argv: Sequence[str], defaults_for_job: Callable[[Any], dict[str, Any]] | None = None):
    """``(job, training_args)`` of ``hf-collapse <method>``, parsed by ``HfArgumentParser`` with ``defaults``; every
    mistake is a :class:`UsageError`. With ``defaults_for_job``, the training defaults depend on the job flags,
    which are read first."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):
            raise UsageError(message)

    if defaults_for_job is not None and not {"-h", "--help"} & set(argv):
        job_only, _ = Parser(job_class, allow_abbrev=False).parse_args_into_dataclasses(
            list(argv), return_remaining_strings=True)
        defaults = defaults_for_job(job_only)
    parser = Parser((job_class, args_class), prog=f"hf-collapse {method}", description=COMMANDS[method],
                    allow_abbrev=False)
    parser.set_defaults(**defaults)
    job, args, unknown = parser.parse_args_into_dataclasses(list(argv), return_remaining_strings=True)
    if unknown:
        raise UsageError(_unknown_flags_message(parser, unknown))
    return job, args


def job_command(method: str, argv: Sequence[str]) -> int:
    """``hf-collapse lacoot|tlc|prune [job flags] [TrainingArguments flags]``, parsed by ``HfArgumentParser``."""
    from transformers import TrainingArguments

    from . import jobs, prune_job
    from .lacoot import LaCoOTArguments
    from .report import describe_speedup, format_count

    job_class, args_class, defaults, run = {
        "lacoot": (jobs.LaCoOTJobArguments, LaCoOTArguments, jobs.DEFAULT_LACOOT_TRAINING, jobs.run_lacoot_job),
        "tlc": (jobs.TLCJobArguments, TrainingArguments, jobs.DEFAULT_TLC_TRAINING, jobs.run_tlc_job),
        "prune": (prune_job.PruneJobArguments, TrainingArguments, prune_job.DEFAULT_PRUNE_TRAINING,
                  prune_job.run_prune_job),
    }[method]
    # lacoot: a causal LM trains on text windows with a much smaller λ; prune: LoRA heals with a larger learning
    # rate than distillation.
    defaults_for_job = {"lacoot": lambda job: jobs.lacoot_training_defaults(jobs.resolve_task(job)),
                        "prune": lambda job: prune_job.prune_training_defaults(job.heal)}.get(method)
    job, args = _parse_job_flags(method, job_class, args_class, defaults, argv, defaults_for_job)
    _, report, summary = run(job, args)
    setting = {"lacoot": lambda: f"λ = {args.msw_weight}",
               "tlc": lambda: f"{job.finetune_steps} fine-tuning steps per layer",
               "prune": lambda: f"{job.method} scores, {job.granularity} units, healing: {job.heal or 'none'}"}[method]()
    print(f"\n{report.method} on {job.model} / {job.dataset} ({setting})\n")
    print(report.to_markdown())
    print(f"\nremoved {summary['removed']} {report.unit_name}: "
          f"{report.metric_name} {summary['metric_before']:.4f} -> {summary['metric_after']:.4f}, "
          f"parameters {format_count(summary['params_before'])} -> {format_count(summary['params_after'])}, "
          f"FLOPs x{summary['flops_ratio']:.2f} fewer" +
          (f", latency {describe_speedup(summary)}" if summary["latency_speedup"] else ""))
    extra = report.extra
    if "perplexity_after_healing" in extra:
        print(f"perplexity after healing ({extra['heal']}): {extra['perplexity_after_healing']:.4f}")
    if "tokens_per_s_before" in extra:
        print(f"generation: {extra['tokens_per_s_before']:.1f} -> {extra['tokens_per_s_after']:.1f} tokens/s "
              f"(x{extra['generation_speedup']:.2f}, KV cache)")
    print(f"saved: {args.output_dir}/collapsed (model), {args.output_dir}/report (report.json, report.md, tradeoff.png)")
    return 0


def trady_command(argv: Sequence[str]) -> int:
    """``hf-collapse trady [job flags] [TrainingArguments flags]``: memory-budgeted fine-tuning with TraDy."""
    from transformers import TrainingArguments

    from . import trady_job

    job, args = _parse_job_flags("trady", trady_job.TraDyJobArguments, TrainingArguments,
                                 trady_job.DEFAULT_TRADY_TRAINING, argv)
    _, summary = trady_job.run_trady_job(job, args)
    print(f"\nTraDy on {job.model} / {job.dataset} ({summary['task']}; budget {summary['budget']}; "
          f"{summary['train_steps']} steps, lr {args.learning_rate:g})\n")
    print(trady_job.memory_markdown(summary))
    print(f"held-out {summary['metric_name']}: {summary['metric_before']:.4f} -> {summary['metric_after']:.4f}")
    saved = ", ".join(f"{path} ({what})" for what, path in summary.get("saved", {}).items())
    print(f"saved: {saved}, {args.output_dir}/memory_report.json, {args.output_dir}/memory_report.md")
    return 0


COMMANDS = {
    "lacoot": "LaCoOT end to end: fine-tune with the MSW penalty, collapse blocks under a metric budget, save",
    "tlc": "TLC end to end: fine-tune, collapse activation layers and fuse the linear maps, save",
    "prune": "depth compression of a causal LM: score, remove under a block count or perplexity budget, heal, "
             "measure perplexity and tokens/s, save (and push)",
    "trady": "memory-budgeted fine-tuning with TraDy: calibrate, train the sampled channels, measure the peak memory "
             "of a training step against full fine-tuning, save the adapter (and the merged model)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-collapse", description="Make Hugging Face models shallower.",
                     epilog="--debug anywhere shows the traceback of an error.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="list a model's blocks with their parameter and FLOPs share")
    inspect.add_argument("model", nargs="?", default="minilm",
                         help="a saved model folder, a Hub repo id, or an embedded model (default: minilm)")
    inspect.add_argument("--seq-len", type=int, default=128, help="sequence length of the text inputs used for FLOPs")
    inspect.set_defaults(handler=inspect_command)
    for name, text in COMMANDS.items():
        commands.add_parser(name, add_help=False, help=f"{text} (see `{name} --help`)")
    return parser


class UsageError(ValueError):
    """A mistake on the command line (exit code 2, one line)."""


def _unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    flags = [a for a in unknown if a.startswith("-")] or unknown
    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flags[0].split("=")[0], known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; see `{parser.prog} --help`"
    return f"unrecognized arguments: {' '.join(unknown)}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-collapse``; returns the exit code (0, or 2 on a mistake, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] == ["trady"]:
            return trady_command(argv[1:])
        if argv[:1] and argv[0] in COMMANDS:
            return job_command(argv[0], argv[1:])
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


if __name__ == "__main__":
    sys.exit(main())

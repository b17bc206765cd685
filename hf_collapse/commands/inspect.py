"""``hf-collapse inspect``: a model's blocks with their share of parameters and FLOPs, and what can be removed."""

from __future__ import annotations

import argparse

__all__ = ["DESCRIPTION", "add_parser", "load_model", "main"]

DESCRIPTION = "list a model's blocks with their parameter and FLOPs share"


def load_model(name_or_path: str):
    """A model from a folder, an embedded short name (``minilm``) or a Hub repository id."""
    from ..data import EMBEDDED_MODELS, check_source
    from ..data.tasks import model_source
    from ..loading import AutoCollapsedModel

    check_source("model", name_or_path, list(EMBEDDED_MODELS), "a saved model folder")
    return AutoCollapsedModel.from_pretrained(model_source(name_or_path)).eval()


def add_parser(commands) -> argparse.ArgumentParser:
    """The ``inspect`` sub-command of the ``hf-collapse`` parser."""
    parser = commands.add_parser("inspect", help=DESCRIPTION)
    parser.add_argument(
        "model",
        nargs="?",
        default="minilm",
        help="a saved model folder, a Hub repo id, or an embedded model (default: minilm)",
    )
    parser.add_argument(
        "--max_length",
        type=int,
        default=128,
        help="tokens of the text inputs used for FLOPs (formerly --seq-len, deprecated)",
    )
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from ..architectures.base import adapter_for
    from ..deprecation import renamed
    from ..metrics import count_parameters, example_inputs, module_flops
    from ..report import format_count
    from ..surgery import collapse_record, find_blocks

    if args.seq_len is not None:
        renamed("--seq-len", "--max_length", "hf-collapse inspect")
        args.max_length = args.seq_len
    model = load_model(args.model)
    adapter = adapter_for(model)
    blocks = find_blocks(model)
    inputs = example_inputs(model, batch_size=1, seq_len=args.max_length)
    paths = [p for b in blocks for p in (b.path, *b.extra_paths)]
    total_flops, flops = module_flops(model, inputs, paths)
    total_params = count_parameters(model)

    record = collapse_record(model)
    print(f"model:  {args.model}")
    print(f"class:  {type(model).__name__}    family: {adapter.family} ({adapter.description})")
    print(
        f"params: {format_count(total_params)}    forward FLOPs: {format_count(total_flops)} "
        f"(batch 1, inputs: {', '.join(f'{k}{tuple(v.shape)}' for k, v in inputs.items() if hasattr(v, 'shape'))})"
    )
    if record:
        removed = sum(len(e["blocks"]) for e in record["edits"] if e["op"] == "remove_blocks")
        linearized = sum(e["op"] == "linearize" for e in record["edits"])
        print(
            f"collapsed by hf_collapse: {removed} block(s) removed, {linearized} activation layer(s) linearized; "
            f"plain from_pretrained exact: {record['plain_reload_exact']}"
        )
    print()
    header = f"{'block':<40} {'stage':>5} {'index':>5} {'params':>9} {'params%':>8} {'FLOPs%':>7}  removable"
    print(header)
    print("-" * len(header))
    for block in blocks:
        block_flops = sum(flops[p] for p in (block.path, *block.extra_paths))
        removable = "yes" if block.removable else f"no: {block.reason}"
        print(
            f"{block.name:<40} {block.stage:>5} {block.index:>5} {format_count(block.params):>9} "
            f"{100 * block.params / total_params:>7.1f}% {100 * block_flops / max(total_flops, 1):>6.1f}%  {removable}"
        )
    print(f"\n{len(blocks)} blocks, {sum(b.removable for b in blocks)} removable")
    return 0

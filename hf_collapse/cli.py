"""The ``hf-collapse`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .architectures.base import adapter_for
from .data import embedded_model_path, is_embedded
from .loading import AutoCollapsedModel
from .metrics import count_parameters, example_inputs, module_flops
from .surgery import collapse_record, find_blocks


def load_model(name_or_path: str):
    """A model from a folder, an embedded short name (``minilm``) or a Hub repository id."""
    source = embedded_model_path(name_or_path) if is_embedded(name_or_path) else name_or_path
    return AutoCollapsedModel.from_pretrained(source).eval()


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def inspect_command(args: argparse.Namespace) -> int:
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
    print(f"params: {_human(total_params)}    forward FLOPs: {_human(total_flops)} "
          f"(batch 1, inputs: {', '.join(f'{k}{tuple(v.shape)}' for k, v in inputs.items() if hasattr(v, 'shape'))})")
    if record:
        removed = sum(len(e["blocks"]) for e in record["edits"])
        print(f"collapsed by hf_collapse: {removed} block(s) removed; plain from_pretrained exact: "
              f"{record['plain_reload_exact']}")
    print()
    header = f"{'block':<40} {'stage':>5} {'index':>5} {'params':>9} {'params%':>8} {'FLOPs%':>7}  removable"
    print(header)
    print("-" * len(header))
    for block in blocks:
        block_flops = sum(flops[p] for p in (block.path, *block.extra_paths))
        removable = "yes" if block.removable else f"no: {block.reason}"
        print(f"{block.name:<40} {block.stage:>5} {block.index:>5} {_human(block.params):>9} "
              f"{100 * block.params / total_params:>7.1f}% {100 * block_flops / max(total_flops, 1):>6.1f}%  {removable}")
    print(f"\n{len(blocks)} blocks, {sum(b.removable for b in blocks)} removable")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-collapse", description="Make Hugging Face models shallower.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="list a model's blocks with their parameter and FLOPs share")
    inspect.add_argument("model", nargs="?", default="minilm",
                         help="a saved model folder, a Hub repo id, or an embedded model (default: minilm)")
    inspect.add_argument("--seq-len", type=int, default=128, help="sequence length of the text inputs used for FLOPs")
    inspect.set_defaults(handler=inspect_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"hf-collapse: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `layerskip` command: one subcommand per module in this package.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` (its
docstring is the subcommand's --help description) and imports torch and friends only
inside ``run``, so that ``--help`` stays instant. ``run`` calls the Python API
(layerskip.api). The CLI turns every ``LayerskipError`` into one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from layerskip import __version__

# name -> module under layerskip.cli
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "calibrate": "calibrate",
    "bench": "bench",
    "report": "report",
    "demo": "demo",
    "export-hf": "export_hf",
    "export-gguf": "export_gguf",
}

ONE_LINE_HELP = {
    "train": "train a model on WikiText-2, with or without LayerSkip (layer dropout + early-exit loss)",
    "eval": "per-layer loss and perplexity of a checkpoint",
    "generate": "generate text: autoregressive, self-speculative (ssd) or dynamic early exit (dee)",
    "calibrate": "calibrate per-layer early-exit thresholds with a risk guarantee",
    "bench": "benchmark decoding strategies and write results.json",
    "report": "tables, plots and an HTML page from results.json",
    "demo": "the whole study in one command: data, train, eval, calibrate, bench, report",
    "export-hf": "export a checkpoint as a Hugging Face LlamaForCausalLM directory",
    "export-gguf": "export a checkpoint (and its first E blocks as a draft) as llama.cpp GGUF files",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerskip",
        description="Train small LMs with LayerSkip on WikiText-2 and decode faster with early exit "
        "and self-speculative decoding.",
    )
    parser.add_argument("--version", action="version", version=f"layerskip {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"layerskip.cli.{module_name}")
        sub = subparsers.add_parser(name, help=ONE_LINE_HELP[name], description=module.__doc__ or ONE_LINE_HELP[name],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from layerskip.device import keep_freed_memory
    from layerskip.errors import LayerskipError

    keep_freed_memory()  # training, evaluation and calibration reuse large CPU blocks instead of re-faulting them
    try:
        return int(args.handler(args) or 0)
    except LayerskipError as exc:
        print(f"layerskip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerskip {args.command}: interrupted", file=sys.stderr)
        return 130

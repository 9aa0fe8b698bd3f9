"""The `layerskip` command: one subcommand per module in this package.

Each subcommand module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``,
and imports torch and friends only inside ``run`` so that ``--help`` stays instant. The
CLI turns every ``LayerskipError`` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from layerskip import __version__

# name -> module under layerskip.cli (None: not built yet)
COMMANDS: dict[str, str | None] = {
    "train": None,
    "eval": None,
    "generate": None,
    "calibrate": None,
    "bench": None,
    "report": None,
    "demo": None,
    "export-hf": None,
}

PENDING_HELP = {
    "train": "train a model on WikiText-2, with or without LayerSkip (layer dropout + early-exit loss)",
    "eval": "per-layer loss and perplexity of a checkpoint",
    "generate": "generate text: autoregressive, self-speculative (ssd) or dynamic early exit (dee)",
    "calibrate": "calibrate per-layer early-exit thresholds with a risk guarantee",
    "bench": "benchmark decoding strategies and write results.json",
    "report": "tables, plots and an HTML page from results.json",
    "demo": "the whole study in one command: data, train, eval, calibrate, bench, report",
    "export-hf": "export a checkpoint as a Hugging Face LlamaForCausalLM directory",
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
        if module_name is None:
            sub = subparsers.add_parser(name, help=PENDING_HELP[name], description=PENDING_HELP[name])
            sub.set_defaults(handler=_not_built(name))
            continue
        module = importlib.import_module(f"layerskip.cli.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def _not_built(name: str):
    def handler(args: argparse.Namespace) -> int:
        print(f"layerskip {name}: not built yet", file=sys.stderr)
        return 2

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from layerskip.errors import LayerskipError

    try:
        return int(args.handler(args) or 0)
    except LayerskipError as exc:
        print(f"layerskip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerskip {args.command}: interrupted", file=sys.stderr)
        return 130

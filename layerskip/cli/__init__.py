"""The `layerskip` command: one subcommand per module in this package.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` (its
docstring is the subcommand's --help description),
and imports torch and friends only inside ``run`` so that ``--help`` stays instant. The
CLI turns every ``LayerskipError`` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from layerskip import __version__

# name -> module under layerskip.cli; a subcommand whose module does not exist yet is
# listed with its one-line help and says it is not built yet.
COMMANDS: dict[str, str] = {
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "calibrate": "calibrate",
    "bench": "bench",
    "report": "report",
    "demo": "demo",
    "export-hf": "export_hf",
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
        module = load_command(module_name)
        if module is None:
            sub = subparsers.add_parser(name, help=ONE_LINE_HELP[name], description=ONE_LINE_HELP[name])
            sub.set_defaults(handler=_not_built(name))
            continue
        sub = subparsers.add_parser(name, help=ONE_LINE_HELP[name], description=module.__doc__ or ONE_LINE_HELP[name],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def load_command(module_name: str) -> ModuleType | None:
    """The subcommand's module, or None while it is not built."""
    full_name = f"layerskip.cli.{module_name}"
    if importlib.util.find_spec(full_name) is None:
        return None
    return importlib.import_module(full_name)


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

"""Per-layer loss and perplexity of a checkpoint: every exit 1..L from one pass.

  layerskip eval --checkpoint runs/layerskip --split test --json runs/layerskip/eval_test.json

--checkpoint takes a checkpoint directory or a run directory (meaning its best checkpoint).
Prints a table of loss, token-level and word-level perplexity per exit; word-level
perplexity = exp(total NLL / words) with the literature's word count, the number comparable
with published WikiText-2 results. The same pass gives each exit's agreement with the last
layer: the share of tokens whose top-1 is the last layer's top-1, and whose last-layer top-1
is within the exit's top-2 and top-4 (teacher-forced; 1.0 at the last layer).
"""

from __future__ import annotations

import argparse

from layerskip.cli.common import add_checkpoint_arg, add_data_dir_arg, add_device_arg, add_dtype_arg, add_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arg(parser)
    parser.add_argument("--split", default="test", choices=["valid", "test"], help="which split (default test)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    add_flag(parser, "batch_size", type=int, default=16, help="sequences per batch (default 16)")
    add_flag(parser, "max_tokens", type=int, default=None, help="evaluate only the first N tokens of the split")
    add_data_dir_arg(parser)
    add_device_arg(parser)
    add_dtype_arg(parser)


def write_json(result, path) -> None:
    """Write an EvalResult as one JSON document, atomically."""
    from layerskip.jsonfile import write_json as write

    write(path, result.to_dict(), flag="--json")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerskip.api import evaluate
    from layerskip.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if args.json and Path(args.json).is_dir():
        raise ConfigError(f"--json {args.json} is a directory; give a file name")
    result = evaluate(args.checkpoint, split=args.split, data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                      batch_size=args.batch_size, max_tokens=args.max_tokens)
    print(result.table())
    if args.json:
        write_json(result, args.json)
    return 0

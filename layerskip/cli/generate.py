"""Generate text from a checkpoint: autoregressive (ar), self-speculative (ssd) or dynamic early exit (dee).

  layerskip generate --checkpoint runs/layerskip --prompt " = Robert Boulter = " --max_length 100
  layerskip generate --checkpoint runs/layerskip --prompt "The game" --mode ssd --draft_layer 3 --k 4
  layerskip generate --checkpoint runs/layerskip --prompt "The game" --temperature 0.8 --top_p 0.9 --seed 1

The prompt and then the new text stream to stdout as they are produced; statistics (tokens/s,
ms/token, acceptance rate, mean accepted length, exit layers) go to stderr and, with --json
OUT, to one JSON document. Temperature 0 (the default) or --greedy means greedy decoding;
greedy ssd prints exactly what greedy ar prints, only faster.

Prompts: an empty prompt, or one that fills the model's context, is an error. When the prompt
plus --max_length new tokens would not fit in the context, generation stops when the context
is full and the statistics say stop_reason "context".
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from layerskip.cli.common import add_checkpoint_arg, add_device_arg, add_dtype_arg, add_flag
from layerskip.cli.dee_args import add_dee_arguments, dee_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arg(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue")
    add_flag(parser, "max_length", type=int, default=100, help="new tokens to generate at most (default 100)")
    add_flag(parser, "mode", choices=("ar", "ssd", "dee"), default="ar",
             help="ar: autoregressive; ssd: self-speculative; dee: dynamic early exit (default ar)")
    sampling = parser.add_argument_group("sampling")
    add_flag(sampling, "temperature", type=float, default=0.0, help="0 (default) means greedy")
    add_flag(sampling, "greedy", action="store_true", help="greedy decoding, whatever --temperature says")
    add_flag(sampling, "top_k", type=int, default=None, help="sample only among the K most likely tokens")
    add_flag(sampling, "top_p", type=float, default=None, help="sample only from the smallest set holding mass P")
    add_flag(sampling, "seed", type=int, default=0, help="random seed of the sampler (default 0)")
    add_flag(parser, "stop_at_eol", action="store_true", help="stop after the first end-of-line token")
    ssd = parser.add_argument_group("self-speculative decoding (--mode ssd)")
    add_flag(ssd, "draft_layer", type=int, default=None,
             help="E: the draft runs the first E blocks and the shared head (default: half the layers)")
    add_flag(ssd, "k", type=int, default=4, help="tokens drafted per round (the most, with --adaptive_threshold)")
    add_flag(ssd, "adaptive_threshold", type=float, default=None,
             help="stop drafting when the draft's top probability falls below this (default: always draft k)")
    add_flag(ssd, "no_bonus", action="store_true",
             help="skip the last draft's pass through the draft layers: no bonus token after an all-accepted "
             "round, cheaper rounds when drafts are rarely all accepted")
    add_flag(ssd, "draft_vocab", type=int, default=None,
             help="draft through a short head of the N most frequent training tokens (cheaper drafts; the "
             "output is unchanged) (default: the full head)")
    add_flag(ssd, "max_backoff", type=int, default=0,
             help="after a round with no accepted draft, decode the next 1, 2, 4, ... (at most N) tokens "
             "without drafting (default 0: off)")
    add_dee_arguments(parser)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write text and statistics as JSON to OUT")
    add_flag(parser, "threads", type=int, default=None,
             help="torch CPU threads (default: layerskip.device.decoding_threads: every idle core, except below "
             "100M parameters where layerskip's CPU kernels do not run: one thread, fastest there)")
    add_device_arg(parser)
    add_dtype_arg(parser)


class TextStream:
    """Prints the decoded sequence as it grows: decode everything, print the new suffix.

    Decoding the whole sequence (not token by token) keeps SentencePiece's spacing and
    multi-byte characters right; text is held back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], out: Any) -> None:
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out
        self.printed = ""

    def write(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        start = len(self.printed)
        if not text.startswith(self.printed):  # earlier text decoded differently: never lose the rest
            if not final:
                return
            start = len(os.path.commonprefix([text, self.printed]))
        if len(text) > start:
            self.out.write(text[start:])
            self.out.flush()
            self.printed = text


def mode_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of the chosen mode, as options of ``layerskip.api.generate``."""
    if args.mode == "ssd":
        return {"draft_layer": args.draft_layer, "k": args.k, "adaptive_threshold": args.adaptive_threshold,
                "bonus": not args.no_bonus, "max_backoff": args.max_backoff, "draft_vocab": args.draft_vocab}
    if args.mode == "dee":
        return dee_options(args)
    return {}


def describe(summary: dict[str, Any]) -> str:
    """One line of statistics for stderr."""
    parts = [
        f"{summary['strategy']}: {summary['new_tokens']} tokens in {summary['seconds']:.3f} s",
        f"{summary['tokens_per_second']:.1f} tokens/s",
        f"{summary['ms_per_token']:.2f} ms/token",
        f"first token {1000 * summary['time_to_first_token']:.1f} ms",
        f"stop: {summary['stop_reason']}",
    ]
    if "acceptance_rate" in summary:
        parts.append(
            f"acceptance {summary['acceptance_rate']:.3f}, mean accepted length "
            f"{summary['mean_accepted_length']:.2f} (E={summary['draft_layer']}, k={summary['k']})"
        )
    for key in ("mean_exit_layer",):
        if key in summary:
            parts.append(f"{key.replace('_', ' ')} {summary[key]:.2f}")
    return ", ".join(parts)


def write_json(document: dict[str, Any], path: str) -> None:
    from layerskip.jsonfile import write_json as write

    write(path, document, flag="--json")


def run(args: argparse.Namespace) -> int:
    import torch

    from layerskip.api import generate, load
    from layerskip.device import decoding_threads
    from layerskip.errors import ConfigError

    if args.max_length < 1:
        raise ConfigError(f"--max_length must be >= 1, got {args.max_length}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    ckpt = load(args.checkpoint, device=args.device, dtype=args.dtype)
    model = ckpt.model
    torch.set_num_threads(args.threads or decoding_threads(model.num_parameters(), model.lm_head.weight.device))
    temperature = 0.0 if args.greedy else args.temperature
    stream = TextStream(ckpt.tokenizer, ckpt.tokenizer.encode(args.prompt), sys.stdout)  # prints the prompt too
    out = generate(ckpt, args.prompt, mode=args.mode, max_new_tokens=args.max_length, temperature=temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_at_eol=args.stop_at_eol,
                   on_tokens=stream.write, **mode_options(args))
    stream.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(describe(out.stats), file=sys.stderr)
    if args.json:
        write_json(
            {
                "command": ["layerskip", *sys.argv[1:]],
                "checkpoint": str(ckpt.path),
                "dtype": str(ckpt.model.embed_tokens.weight.dtype).removeprefix("torch."),
                "mode": args.mode,
                "sampling": {"temperature": temperature, "top_k": args.top_k, "top_p": args.top_p,
                             "seed": args.seed},
                "prompt": args.prompt,
                "prompt_ids": out.prompt_tokens,
                "text": out.text,
                "tokens": out.tokens,
                "summary": out.stats,
                "token_info": out.token_info,
            },
            args.json,
        )
    return 0

"""Where a batch-1 decoding step's time goes, and what that allows early exit to save.

    python benchmarks/decode_costs.py --checkpoint runs/study/layerskip
    # with a DEE exit histogram (tokens exiting after block 1..L, e.g. from `layerskip bench`):
    python benchmarks/decode_costs.py --checkpoint runs/study/layerskip --exit_counts 424,216,43,37,37,1291

Times, in one process and one torch thread, inside the decoding scope, each piece of one
token's step at a mid-context position (medians of interleaved repetitions):

- the whole autoregressive step (embed, every block, the full head, argmax), as the
  Autoregressive strategy runs it;
- one block (``run_blocks`` over a single layer), the full head with argmax, a confidence
  check through the short head (softmax maximum), and CALM propagation of one token's K/V
  to the layers it skipped;
- the rest of the step: the whole minus L blocks minus the head (embedding, slicing,
  dispatch between the pieces).

With --exit_counts it estimates DEE's time per token from those costs: a token exiting after
block l runs l blocks, one check at each checked layer up to l, propagation to L - l layers,
and the full head only when it reaches the last layer; and the same with free checks, which
is the most that cheaper confidence checks could give on this model. Compare the estimate
with the speed-up `layerskip bench` measured to see whether the cost model holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layerskip.config import ModelConfig  # noqa: E402
from layerskip.errors import ConfigError, run_script  # noqa: E402
from layerskip.generate.dee import FusedPropagation, logit_confidence  # noqa: E402
from layerskip.model import Transformer, decoding  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: a random default-size model)")
    p.add_argument("--exit_vocab", type=int, default=1024, help="tokens in the short exit head (default 1024)")
    p.add_argument("--position", type=int, default=64, help="context length the step runs at (default 64)")
    p.add_argument("--repeats", type=int, default=2000, help="timed repetitions of each piece (default 2000)")
    p.add_argument("--exit_counts", default=None,
                   help="tokens exiting after block 1..L, comma-separated: estimate DEE's time from the costs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def load(args) -> Transformer:
    if args.checkpoint is None:
        torch.manual_seed(0)
        return Transformer(ModelConfig(dropout=0.0)).eval()
    from layerskip.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint).model.eval()


def time_pieces(pieces: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median microseconds of each piece, the pieces interleaved so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, run in pieces.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


@decoding()
def measure(model: Transformer, exit_vocab: int, position: int, repeats: int) -> dict[str, float]:
    num_layers = model.num_layers
    if not 1 <= position < model.config.max_seq_len:
        raise ConfigError(f"--position must be in 1..{model.config.max_seq_len - 1}, got {position}")
    torch.manual_seed(0)
    cache = model.new_cache()
    prompt = torch.randint(model.config.vocab_size, (1, position))
    model.run_blocks(model.embed(prompt), 0, num_layers, cache=cache, pos=0)
    token = prompt[:, -1:]
    hidden = model.run_blocks(model.embed(token), 0, num_layers, cache=cache, pos=position)
    rope = model.rotary(position, 1)
    propagate = FusedPropagation.for_model(model)
    middle = num_layers // 2

    def ar_step() -> int:  # the Autoregressive strategy's loop body
        h = model.run_blocks(model.embed(token), 0, num_layers, cache=cache, pos=position)
        return int(model.unembed(h)[0, -1].argmax())

    pieces = {
        "ar_step": ar_step,
        "block": lambda: model.run_blocks(hidden, middle, middle + 1, cache=cache, pos=position, rope=rope),
        "full_head": lambda: int(model.unembed(hidden)[0, -1].argmax()),
        "check": lambda: logit_confidence(model.unembed_short(hidden, exit_vocab)[0], "softmax").item(),
        "propagate": lambda: propagate(model, hidden, middle, position, cache),
    }
    for run in pieces.values():  # warm-up: derived weights, allocator
        run()
    costs = time_pieces(pieces, repeats)
    costs["rest"] = costs["ar_step"] - num_layers * costs["block"] - costs["full_head"]
    return costs


def dee_estimate(costs: dict[str, float], counts: list[int]) -> tuple[float, float, float]:
    """(estimated DEE us/token, the same with free checks, mean exit layer) for an exit histogram.

    Propagation is charged at its measured cost for the middle layer's remainder, whatever
    the exit layer (one product for any number of layers; its size barely matters here).
    """
    num_layers, total = len(counts), sum(counts)
    time_with, time_free = 0.0, 0.0
    for layer, count in enumerate(counts, start=1):
        exits_early = layer < num_layers
        checks = layer if exits_early else num_layers - 1
        base = costs["rest"] + layer * costs["block"]
        base += costs["propagate"] if exits_early else costs["full_head"]
        time_free += count * base
        time_with += count * (base + checks * costs["check"])
    mean_exit = sum(layer * c for layer, c in enumerate(counts, start=1)) / total
    return time_with / total, time_free / total, mean_exit


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args)
    counts = None
    if args.exit_counts is not None:
        counts = [int(x) for x in args.exit_counts.split(",") if x.strip()]
        if len(counts) != model.num_layers or any(c < 0 for c in counts) or not sum(counts):
            raise ConfigError(f"--exit_counts needs {model.num_layers} non-negative counts (exits after block "
                              f"1..{model.num_layers}) with a positive sum, got {args.exit_counts!r}")
    costs = measure(model, args.exit_vocab, args.position, args.repeats)
    print(f"one token's step at position {args.position}, {args.threads} thread(s), median of {args.repeats}:")
    for name in ("ar_step", "block", "full_head", "check", "propagate", "rest"):
        print(f"  {name:10s} {costs[name]:8.1f} us")
    ar = costs["ar_step"]
    print(f"  blocks are {model.num_layers * costs['block'] / ar:.0%} of the step, the full head "
          f"{costs['full_head'] / ar:.0%}, the rest {costs['rest'] / ar:.0%}; a check costs "
          f"{costs['check'] / costs['block']:.2f} blocks")
    if counts is not None:
        with_checks, free_checks, mean_exit = dee_estimate(costs, counts)
        print(f"DEE with this exit histogram (mean exit layer {mean_exit:.2f}): estimated {with_checks:.0f} us/token, "
              f"{ar / with_checks:.2f}x over AR; with free checks {free_checks:.0f} us/token, "
              f"{ar / free_checks:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "decode_costs.py"))

"""Where a batch-1 decoding step's time goes, and what that allows early exit to save.

    python benchmarks/decode_costs.py --checkpoint runs/study/layerskip
    # with a DEE exit histogram (tokens exiting after block 1..L, e.g. from `layerskip bench`):
    python benchmarks/decode_costs.py --checkpoint runs/study/layerskip --exit_counts 424,216,43,37,37,1291
    # the share of tokens that must exit at each layer for DEE to run 1.3x faster than AR:
    python benchmarks/decode_costs.py --checkpoint runs/study/layerskip --target 1.3

Times each piece of one token's step (one block, the full head, a confidence check through
the short head, CALM propagation, the rest) in one process, one torch thread by default;
with --exit_counts, estimates DEE's time per token from them, with and without the cost of
the checks; with --target, prints the share of tokens that would have to exit at each layer
(the others running the whole model) for DEE to reach that speed-up. `layerskip bench`
records the same costs per model (layerskip.costs).
"""

from __future__ import annotations

import argparse

import torch

from layerskip.bench.models import load_model
from layerskip.costs import PIECES, StepCosts, dee_estimate, exit_share_needed, measure_step_costs
from layerskip.errors import run_script


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: a random default-size model)")
    p.add_argument("--exit_vocab", type=int, default=1024,
                   help="tokens in the exit head a check reads (default 1024; 0: the full head)")
    p.add_argument("--position", type=int, default=64, help="context length the step runs at (default 64)")
    p.add_argument("--repeats", type=int, default=2000, help="timed repetitions of each piece (default 2000)")
    p.add_argument("--exit_counts", default=None,
                   help="tokens exiting after block 1..L, comma-separated: estimate DEE's time from the costs")
    p.add_argument("--target", type=float, default=None,
                   help="a DEE speed-up over AR: print the share of tokens that must exit at each layer to reach it")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).model
    counts = None if args.exit_counts is None else [int(x) for x in args.exit_counts.split(",") if x.strip()]
    costs = measure_step_costs(model, check_vocab=args.exit_vocab or None, position=args.position,
                               repeats=args.repeats)
    estimate = None if counts is None else dee_estimate(costs, counts)
    print(f"one token's step at position {costs.position}, {costs.threads} thread(s), median of {costs.repeats}:")
    for name in PIECES:
        print(f"  {name:10s} {getattr(costs, name):8.1f} us")
    ar = costs.ar_step
    print(f"  blocks are {costs.num_layers * costs.block / ar:.0%} of the step, the full head "
          f"{costs.full_head / ar:.0%}, the rest {costs.rest / ar:.0%}; a check costs "
          f"{costs.check / costs.block:.2f} blocks")
    if estimate is not None:
        print(f"DEE with this exit histogram (mean exit layer {estimate.mean_exit_layer:.2f}): estimated "
              f"{estimate.us_per_token:.0f} us/token, {estimate.speedup:.2f}x over AR; with free checks "
              f"{estimate.us_per_token_free_checks:.0f} us/token, {estimate.speedup_free_checks:.2f}x")
    if args.target is not None:
        print_needed_shares(costs, args.target)
    return 0


def print_needed_shares(costs: StepCosts, target: float) -> None:
    with_checks = exit_share_needed(costs, target)
    free = exit_share_needed(costs, target, free_checks=True)
    print(f"for {target:.2f}x over AR, the share of tokens that must exit after block l (the rest running "
          "every block):")
    for layer in with_checks:
        shown = ["out of reach" if share is None else f"{share:.0%}" for share in (with_checks[layer], free[layer])]
        print(f"  l={layer}: {shown[0]:>12s} with checks, {shown[1]:>12s} if checks were free")


if __name__ == "__main__":
    raise SystemExit(run_script(main, "decode_costs.py"))

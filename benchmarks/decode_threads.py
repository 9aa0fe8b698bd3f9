"""How many torch threads decode fastest, per model size: the measurement behind layerskip.device.decoding_threads.

For each shape of benchmarks/scale.py (random weights, --dtype), greedy AR decoding with 1, 2,
... --max-threads threads, interleaved per repeat; decode ms/token is (T(n) - T(1)) / (n - 1).
Prints one line per shape and the smallest size from which more threads won, to compare
with device.THREADS_MIN_PARAMETERS. Run it on a quiet machine (the load average is printed):
on a busy one every extra thread waits for descheduled siblings.

    python benchmarks/decode_threads.py --sizes seed-2.6M d256-12L d512-12L d768-16L --dtype float32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from layerskip.bench.models import random_model
from layerskip.console import log
from layerskip.decoding import Autoregressive
from layerskip.device import THREADS_MIN_PARAMETERS, available_cores
from layerskip.errors import run_script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import DTYPES, SIZES  # noqa: E402 (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["seed-2.6M", "d256-12L", "d512-12L",
                                                                        "d768-16L"])
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--max-threads", type=int, default=available_cores(), help="default: the available cores")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=24)
    return p.parse_args(argv)


def decode_ms(model, threads: int, n: int) -> float:
    torch.set_num_threads(threads)
    prompt = list(range(5, 21))
    first = Autoregressive().generate(model, prompt, 1).seconds
    return 1e3 * (Autoregressive().generate(model, prompt, n).seconds - first) / (n - 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = range(1, max(1, args.max_threads) + 1)
    log(f"load average {os.getloadavg()}, {available_cores()} cores, {args.dtype}")
    first_win = None
    for name in args.sizes:
        model = random_model(0, SIZES[name][0], dtype=DTYPES[args.dtype])
        for t in counts:  # warm-up: copies, the allocator, the thread pool
            decode_ms(model, t, 3)
        samples = {t: [] for t in counts}
        for _ in range(args.repeats):
            for t in counts:
                samples[t].append(decode_ms(model, t, args.new_tokens))
        ms = {t: statistics.median(s) for t, s in samples.items()}
        best = min(ms, key=ms.get)
        if best > 1 and first_win is None:
            first_win = model.num_parameters()
        print(f"{name} ({model.num_parameters() / 1e6:.1f}M): "
              + ", ".join(f"{t} thread(s) {v:.2f} ms/token" for t, v in ms.items()) + f"; fastest: {best}")
    print(f"more threads first won at {first_win} parameters; decoding_threads uses {THREADS_MIN_PARAMETERS:,}")
    log(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "decode_threads.py"))

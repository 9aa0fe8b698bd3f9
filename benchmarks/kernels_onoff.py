"""AR decoding with layerskip's CPU kernels (layerskip.kernels) on and off, per model size and dtype.

For each shape (random weights) and dtype, greedy AR at the threads `decoding_threads` gives it
on an idle machine (or --threads), kernels on and off interleaved per repeat; decode ms/token
is (T(n) - T(1)) / (n - 1). Also checks that greedy SSD (E = a quarter of the layers, k = 4)
gives AR's tokens with the kernels on. One line per (shape, dtype).

    python benchmarks/kernels_onoff.py                               # float32, seed to 157M: ~3 minutes
    python benchmarks/kernels_onoff.py --dtypes bfloat16 --sizes d512-12L d1536-16L
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from layerskip import kernels
from layerskip.bench.models import random_model
from layerskip.console import log
from layerskip.decoding import Autoregressive, SelfSpeculative
from layerskip.device import decoding_threads
from layerskip.errors import ConfigError, run_script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_threads import decode_ms  # noqa: E402 (benchmarks/ is the script's directory)
from scale import DTYPES, SIZES  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["seed-2.6M", "d256-12L", "d512-12L",
                                                                        "d768-16L"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32"])
    p.add_argument("--threads", type=int, default=None, help="default: decoding_threads's choice per size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    if not kernels.available():
        raise ConfigError(f"the kernels are {kernels.status()}: nothing to compare on this machine")
    return args


def decode_ms_with(model, threads: int, n: int, enabled: bool) -> float:
    kernels.ENABLED = enabled
    return decode_ms(model, threads, n)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"load average {os.getloadavg()}; kernels {kernels.status()}")
    for name in args.sizes:
        config, _ = SIZES[name]
        for dtype_name in args.dtypes:
            model = random_model(0, config, dtype=DTYPES[dtype_name])
            threads = args.threads or decoding_threads(model.num_parameters(), "cpu", load=0.0)
            samples = {True: [], False: []}
            for enabled in samples:  # warm-up: copies, the allocator, the thread pool
                decode_ms_with(model, threads, 3, enabled)
            for _ in range(args.repeats):
                for enabled in samples:
                    samples[enabled].append(decode_ms_with(model, threads, args.new_tokens, enabled))
            on, off = (statistics.median(samples[enabled]) for enabled in (True, False))
            kernels.ENABLED = True
            prompt, e = list(range(5, 21)), max(1, config.num_layers // 4)
            same = (SelfSpeculative(e, 4).generate(model, prompt, args.new_tokens).tokens
                    == Autoregressive().generate(model, prompt, args.new_tokens).tokens)
            print(f"{name} ({model.num_parameters() / 1e6:.1f}M) {dtype_name}, {threads} thread(s): kernels "
                  f"{on:.2f} ms/token, torch {off:.2f} ms/token: {off / on:.2f}x; greedy SSD E={e} k=4 "
                  f"{'equals' if same else 'DIFFERS FROM'} AR", flush=True)
    log(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "kernels_onoff.py"))

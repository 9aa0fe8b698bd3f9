"""float32 or bfloat16, per model size: the measurement behind `--dtype auto` on the CPU (layerskip.dtypes).

For each shape (random weights, both dtypes built from the same seed), greedy AR decoding at
the threads `layerskip.device.decoding_threads` gives it on an idle machine, interleaved per
repeat; decode ms/token is (T(n) - T(1)) / (n - 1). Prints one line per shape and the
smallest size from which bfloat16 won, to compare with dtypes.cpu_bf16_min_parameters() (which
depends on whether layerskip's bf16 kernels run here; --no-kernels measures torch's products).

    python benchmarks/decode_dtypes.py                      # about 5 minutes
    python benchmarks/decode_dtypes.py --no-kernels --sizes d256-12L d768-16L
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from layerskip import kernels
from layerskip.bench.models import random_model
from layerskip.config import ModelConfig
from layerskip.console import log
from layerskip.device import decoding_threads
from layerskip.dtypes import cpu_bf16_min_parameters
from layerskip.errors import run_script

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_threads import decode_ms  # noqa: E402 (benchmarks/ is the script's directory)
from scale import CONTEXT, SIZES  # noqa: E402

SMALL = dict(dropout=0.0, max_seq_len=CONTEXT)
# between the seed's 2.6M and scale.py's next shape (14.7M), where the crossover lies with the kernels
SHAPES = {"seed-2.6M": SIZES["seed-2.6M"][0],
          "d192-6L": ModelConfig(d_model=192, num_layers=6, d_ff=768, **SMALL),
          "d256-6L": ModelConfig(d_model=256, num_layers=6, d_ff=1024, **SMALL),
          "d320-8L": ModelConfig(d_model=320, num_layers=8, d_ff=1280, **SMALL),
          **{name: SIZES[name][0] for name in ("d256-12L", "d512-12L", "d768-16L", "d1536-16L")}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--no-kernels", action="store_true", help="torch's bf16 products and SDPA, not layerskip's")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kernels.ENABLED = not args.no_kernels
    log(f"load average {os.getloadavg()}; bf16 kernels {kernels.status()}")
    first_win = None
    for name in args.sizes:
        models = {dtype: random_model(0, SHAPES[name], dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
        params = models[torch.float32].num_parameters()
        threads = decoding_threads(params, "cpu", load=0.0)
        for model in models.values():  # warm-up: copies, the allocator, the thread pool
            decode_ms(model, threads, 3)
        samples = {dtype: [] for dtype in models}
        for _ in range(args.repeats):
            for dtype, model in models.items():
                samples[dtype].append(decode_ms(model, threads, args.new_tokens))
        fp32, bf16 = (statistics.median(samples[dtype]) for dtype in models)
        if bf16 < fp32 and first_win is None:
            first_win = params
        print(f"{name} ({params / 1e6:.1f}M, {threads} thread(s)): float32 {fp32:.2f}, bfloat16 {bf16:.2f} "
              f"ms/token; bfloat16 {fp32 / bf16:.2f}x", flush=True)
    print(f"bfloat16 first won at {first_win} parameters; --dtype auto switches at {cpu_bf16_min_parameters():,}")
    log(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "decode_dtypes.py"))

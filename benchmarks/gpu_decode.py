"""A short decoding benchmark for a machine with a GPU: AR, SSD and DEE on the study's shape and Llama 3.2 1B's.

Random weights with the best-case construction (blocks after E switched off and the short
head holding the tokens the model emits, so SSD's drafts are all accepted); every strategy checked against AR (greedy SSD, and DEE with an unreachable
threshold, must give AR's tokens); ms/token medians over interleaved repeats and the peak GPU
memory. benchmarks/gpu_check.sh runs it after the CUDA tests; it also runs on a CPU (slowly).

    python benchmarks/gpu_decode.py --device cuda --out gpu_decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from layerskip.bench.machine import machine_info, versions
from layerskip.bench.models import best_case, random_model
from layerskip.bench.prompts import random_prompts
from layerskip.decoding import Autoregressive, DynamicEarlyExit, SelfSpeculative
from layerskip.device import resolve_device, synchronize
from layerskip.errors import run_script
from layerskip.fastpath import FastDecoder
from layerskip.jsonfile import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import DTYPES, SIZES, favour_emitted_tokens  # noqa: E402 (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    p.add_argument("--shapes", nargs="+", default=["seed-2.6M:float32", "seed-2.6M:bfloat16", "llama3.2-1B:bfloat16"],
                   help="SIZE:DTYPE pairs (sizes of benchmarks/scale.py)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="gpu_decode.json")
    return p.parse_args(argv)


def strategies(e: int) -> dict:
    return {"ar": Autoregressive(), **{f"ssd_k{k}": SelfSpeculative(e, k) for k in (4, 8)},
            "ssd_k8_short": SelfSpeculative(e, 8, draft_vocab=1024), "dee_0.5": DynamicEarlyExit(0.5),
            "dee_unreachable": DynamicEarlyExit(2.0)}


def bench_shape(size: str, dtype: str, args: argparse.Namespace, device: torch.device) -> dict:
    config, e = SIZES[size]
    started = time.perf_counter()
    model = best_case(random_model(0, config, dtype=DTYPES[dtype]), e).to(device)
    build = time.perf_counter() - started
    prompt = random_prompts(config.vocab_size, 1, 16, seed=0)[0]
    favour_emitted_tokens(model, Autoregressive().generate(model, prompt, args.new_tokens).tokens)  # short head's best
    runs = strategies(e)
    for strategy in runs.values():
        strategy.generate(model, prompt, 4)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms, tokens, stats = {label: [] for label in runs}, {}, {}
    for _ in range(args.repeats):
        for label, strategy in runs.items():
            synchronize(device)
            result = strategy.generate(model, prompt, args.new_tokens)
            ms[label].append(result.ms_per_token)
            tokens[label] = result.tokens
            stats[label] = {k: v for k, v in result.stats.items() if not isinstance(v, (list, dict))}
    median = {label: statistics.median(v) for label, v in ms.items()}
    return {"size": size, "dtype": dtype, "draft_layer": e, "num_parameters": model.num_parameters(),
            "layout": FastDecoder.of(model).layout, "build_seconds": build, "ms_per_token": median,
            "speedup_over_ar": {label: median["ar"] / v for label, v in median.items()},
            "equal_to_ar": {label: tokens[label] == tokens["ar"] for label in runs if label != "dee_0.5"},
            "stats": stats,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    records = []
    for pair in args.shapes:
        size, _, dtype = pair.partition(":")
        record = bench_shape(size, dtype or "bfloat16", args, device)
        records.append(record)
        speed = ", ".join(f"{label} {v:.2f} ms ({record['speedup_over_ar'][label]:.2f}x)"
                          for label, v in record["ms_per_token"].items())
        print(f"{size} {record['dtype']} ({record['layout']}): {speed}; equal to AR: {record['equal_to_ar']}",
              flush=True)
    write_json(args.out, {"command": [sys.executable, *sys.argv], "machine": machine_info(device),
                          "versions": versions(), "shapes": records})
    failed = [(r["size"], r["dtype"], label) for r in records for label, ok in r["equal_to_ar"].items() if not ok]
    if failed:
        print(f"NOT EQUAL TO AR: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "gpu_decode.py"))

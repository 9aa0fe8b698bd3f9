"""layerskip's bf16 CPU kernels (layerskip.kernels) against torch's, on a synthetic public shape.

In one process, interleaved per repeat, random weights (the best-case construction of
benchmarks/scale.py, so every draft is accepted):

- the machine's limit: read bandwidth (a float32 sum over a buffer far larger than the caches)
  and copy bandwidth (read + written), as scale.py measures them; the limit takes the larger;
- products: every block weight and the head once, for --rows rows, torch's F.linear against
  kernels.linear, as GB of weights read per second;
- attention of 1 and --verify-rows queries over the cache at the middle of the run: SDPA (the
  fast path's choice without the kernel) against kernels.attention, microseconds per call;
- decoding: AR ms/token ((T(n) - T(1)) / (n - 1)) and best-case SSD (E = the paper's, k = --ks),
  kernels on and off; AR against the bandwidth limit; greedy SSD checked token for token against AR
  with each setting.

Writes --out (JSON: everything, with the command, versions and machine) and prints a summary.

    python benchmarks/bf16_kernels.py                       # the Llama 3.2 1B shape, 2 threads: ~5 minutes
    python benchmarks/bf16_kernels.py --size d1536-16L --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from layerskip import kernels
from layerskip.bench.machine import load_average, machine_info, versions
from layerskip.bench.models import best_case, random_model
from layerskip.bench.prompts import random_prompts
from layerskip.console import log
from layerskip.decoding import Autoregressive, SelfSpeculative
from layerskip.errors import ConfigError, run_script
from layerskip.jsonfile import write_json
from layerskip.model import causal_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import SIZES, copy_bandwidth, read_bandwidth, step_bytes  # noqa: E402 (benchmarks/ is the script's directory)

BANDWIDTH_BYTES = 2**30  # far beyond any cache


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="llama3.2-1B")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved passes over every configuration")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 9, 13, 16], help="product rows to time")
    p.add_argument("--verify-rows", type=int, default=13, help="queries of the timed verification attention")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 12], help="SSD draft lengths")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bf16_kernels.json"))
    args = p.parse_args(argv)
    if not kernels.available():
        raise ConfigError(f"the bf16 kernels are {kernels.status()}: nothing to compare on this machine")
    if max(args.rows) > kernels.MAX_ROWS or args.verify_rows > kernels.MAX_ROWS:
        raise ConfigError(f"--rows and --verify-rows go up to kernels.MAX_ROWS = {kernels.MAX_ROWS}")
    return args


def median_seconds(run, repeats: int) -> float:
    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def with_kernels(enabled: bool, run):
    def switched():
        previous, kernels.ENABLED = kernels.ENABLED, enabled
        try:
            return run()
        finally:
            kernels.ENABLED = previous
    return switched


def products(model, rows_list: list[int], repeats: int) -> dict[str, dict]:
    """GB/s of one pass over every block weight and the head, F.linear vs the kernel, per row count."""
    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
    weights.append(model.lm_head.weight)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    out = {}
    for rows in rows_list:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(torch.bfloat16) for w in weights}
        passes = {"torch": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                  "kernel": lambda: [kernels.linear(xs[w.shape[1]], w) for w in weights]}
        seconds = {label: [] for label in passes}
        for _ in range(repeats):
            for label, run in passes.items():
                seconds[label].append(median_seconds(run, 1))
        out[str(rows)] = {label: {"ms": 1e3 * statistics.median(s), "gb_per_s": nbytes / statistics.median(s) / 1e9}
                          for label, s in seconds.items()}
    return {"weight_bytes": nbytes, "by_rows": out}


def attention_calls(model, position: int, queries_list: list[int], repeats: int) -> dict[str, dict]:
    cfg = model.config
    out = {}
    for queries in queries_list:
        q = torch.randn(1, queries, cfg.num_heads, cfg.head_dim).to(torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(1, cfg.kv_heads, position + queries, cfg.head_dim).to(torch.bfloat16) for _ in "kv")
        scale = cfg.head_dim**-0.5
        calls = {"sdpa": lambda: causal_attention(q, k, v, scale=scale),
                 "kernel": lambda: kernels.attention(q, k, v, scale)}
        seconds = {label: [] for label in calls}
        for _ in range(repeats):
            for label, run in calls.items():
                seconds[label].append(median_seconds(lambda: [run() for _ in range(20)], 1) / 20)
        out[str(queries)] = {label: 1e6 * statistics.median(s) for label, s in seconds.items()}
    return out


def decoding(model, prompt: list[int], args, e: int) -> dict[str, dict]:
    """ms/token per strategy, kernels on and off, and the tokens each produced."""
    n = args.new_tokens
    strategies = {"ar": Autoregressive(), **{f"ssd_k{k}": SelfSpeculative(e, k) for k in args.ks}}
    configs = {}
    for enabled in (True, False):
        label = "kernels" if enabled else "torch"
        configs[f"{label}/first"] = with_kernels(enabled, lambda: Autoregressive().generate(model, prompt, 1))
        for name, strategy in strategies.items():
            configs[f"{label}/{name}"] = with_kernels(enabled, lambda s=strategy: s.generate(model, prompt, n))
    results = {label: {"seconds": []} for label in configs}
    for run in configs.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for label, run in configs.items():
            result = run()
            results[label]["seconds"].append(result.seconds)
            results[label]["tokens"] = result.tokens
    out = {}
    for label, entry in results.items():
        setting, name = label.split("/")
        if name == "first":
            continue
        first = statistics.median(results[f"{setting}/first"]["seconds"])
        out[label] = {"ms_per_token": 1e3 * (statistics.median(entry["seconds"]) - first) / (n - 1),
                      "tokens": entry["tokens"]}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config, e = SIZES[args.size]
    log(f"bf16_kernels: {args.size}, {args.threads} threads, kernels {kernels.status()}, load {load_average()}")
    read, copy = (measure(BANDWIDTH_BYTES, torch.device("cpu")) for measure in (read_bandwidth, copy_bandwidth))
    model = best_case(random_model(0, config, dtype=torch.bfloat16), e)
    prompt = random_prompts(config.vocab_size, 1, args.prompt_tokens, seed=0)[0]
    position = args.prompt_tokens + args.new_tokens // 2
    with torch.inference_mode():
        record = {"products": products(model, args.rows, args.repeats),
                  "attention_us": attention_calls(model, position, [1, args.verify_rows], args.repeats)}
    record["decoding"] = decoding(model, prompt, args, e)
    limit_ms = 1e3 * step_bytes(model, position) / max(read, copy)
    record.update(size=args.size, draft_layer=e, threads=args.threads, step_bytes=step_bytes(model, position),
                  read_bandwidth=read, copy_bandwidth=copy, ar_limit_ms=limit_ms, kernels=kernels.status(),
                  command=" ".join(sys.argv), machine=machine_info(torch.device("cpu")), versions=versions(),
                  load_average_end=load_average())
    write_json(args.out, record)

    print(f"{args.size}, {args.threads} threads; read bandwidth {read / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s")
    for rows, r in record["products"]["by_rows"].items():
        print(f"products, {rows} row(s): torch {r['torch']['gb_per_s']:.1f} GB/s, kernel {r['kernel']['gb_per_s']:.1f}"
              f" GB/s ({r['torch']['ms'] / r['kernel']['ms']:.2f}x)")
    for queries, r in record["attention_us"].items():
        print(f"attention, {queries} quer{'y' if queries == '1' else 'ies'} at position {position}: "
              f"SDPA {r['sdpa']:.0f} us, kernel {r['kernel']:.0f} us")
    dec = record["decoding"]
    for setting in ("kernels", "torch"):
        ar = dec[f"{setting}/ar"]
        line = [f"{setting}: AR {ar['ms_per_token']:.1f} ms/token ({limit_ms / ar['ms_per_token']:.0%} of the "
                f"bandwidth limit {limit_ms:.1f} ms)"]
        for k in args.ks:
            ssd = dec[f"{setting}/ssd_k{k}"]
            same = "same tokens" if ssd["tokens"] == ar["tokens"] else "OTHER TOKENS"
            line.append(f"SSD k={k} {ar['ms_per_token'] / ssd['ms_per_token']:.2f}x ({same} as AR)")
        print("; ".join(line))
    print(f"AR with the kernels: {dec['torch/ar']['ms_per_token'] / dec['kernels/ar']['ms_per_token']:.2f}x faster; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "bf16_kernels.py"))

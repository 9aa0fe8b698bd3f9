"""Decode speed: autoregressive vs self-speculative decoding, greedy, over a sweep of E and k.

    # a trained checkpoint on the prompts `layerskip bench` decodes (seeded test-split paragraphs)
    python benchmarks/decode_speed.py --checkpoint runs/layerskip --prompts 100
    # no checkpoint: a random default-size model (d128, 6 layers, vocab 8192, context 256) on
    # random prompts (both from layerskip.bench.models); --best_case zeroes what blocks 1..L-1 add to the residual stream, so every draft is
    # accepted at the same compute cost: the ceiling of SSD's speed-up on this machine
    python benchmarks/decode_speed.py --best_case --draft_layers 2,3 --ks 2,4,6

Every prompt runs AR and every SSD config back to back (interleaved, in rotating order, so
machine noise hits all alike), after warm-up runs. Reported per config: the median over
prompts of ms/token (prefill included: the whole generate call), the median over prompts of
the per-prompt speed-up AR/SSD, the acceptance rate and mean accepted drafts per round
over all prompts, and how many outputs equal AR's token for token (greedy SSD must: 100%).
--json OUT writes everything, with the command, as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from layerskip.bench.machine import cpu_model
from layerskip.bench.models import load_model
from layerskip.decoding import Autoregressive, SelfSpeculative
from layerskip.errors import run_script


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: a random model)")
    p.add_argument("--data_dir", default=None, help="WikiText-2 directory (default: $LAYERSKIP_DATA_DIR, cache)")
    p.add_argument("--prompts", type=int, default=20, help="number of prompts (default 20)")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new_tokens", type=int, default=64, help="new tokens per generation (default 64)")
    p.add_argument("--draft_layers", type=int_list, default=None, help="E values, e.g. 1,2,3 (default 1..L-1)")
    p.add_argument("--ks", type=int_list, default=[2, 3, 4, 6], help="k values (default 2,3,4,6)")
    p.add_argument("--adaptive", type=float_list, default=[],
                   help="also run each (E, max k) with these adaptive thresholds, e.g. 0.3,0.5")
    p.add_argument("--draft_vocab", type=int_list, default=[0],
                   help="short draft heads to run every (E, k) with, e.g. 0,1024 (0: the full head; default 0)")
    p.add_argument("--no_bonus", action="store_true", help="also run every (E, k) with bonus=False (no tail pass)")
    p.add_argument("--backoff", type=int, default=0,
                   help="also run every (E, k) and adaptive config with max_backoff=N (default 0: not)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest at batch 1 here)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--best_case", action="store_true",
                   help="zero the residual writes of blocks 1..L-1 so every draft is accepted (random model only)")
    p.add_argument("--residual_scale", type=float, default=0.0,
                   help="with --best_case: scale those writes by this instead of 0, so some drafts are "
                   "rejected (e.g. 0.05); a stand-in for intermediate acceptance rates")
    p.add_argument("--warmup", type=int, default=2, help="warm-up prompts, not timed (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    return p.parse_args(argv)


def strategies(args, num_layers: int) -> dict[str, object]:
    configs: dict[str, object] = {"ar": Autoregressive()}
    for e in args.draft_layers or range(1, num_layers):
        for k in args.ks:
            for vocab in args.draft_vocab:
                if vocab:
                    configs[f"ssd E={e} k={k} head {vocab}"] = SelfSpeculative(e, k, draft_vocab=vocab)
                else:
                    configs[f"ssd E={e} k={k}"] = SelfSpeculative(e, k)
            if args.no_bonus:
                configs[f"ssd E={e} k={k} no-bonus"] = SelfSpeculative(e, k, bonus=False)
            if args.backoff:
                configs[f"ssd E={e} k={k} backoff<={args.backoff}"] = SelfSpeculative(e, k, max_backoff=args.backoff)
        for t in args.adaptive:
            configs[f"ssd E={e} k<={max(args.ks)} conf>={t:g}"] = SelfSpeculative(e, max(args.ks), adaptive_threshold=t)
            if args.backoff:
                configs[f"ssd E={e} k<={max(args.ks)} conf>={t:g} backoff"] = SelfSpeculative(
                    e, max(args.ks), adaptive_threshold=t, max_backoff=args.backoff)
    return configs


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = load_model(args.checkpoint, seed=args.seed, best_case_after=1 if args.best_case else None,
                       residual_scale=args.residual_scale)
    prompts = bench.prompts(args.prompts + args.warmup, args.prompt_len, args.seed, args.data_dir)
    model = bench.model.to(getattr(torch, args.dtype))
    configs = strategies(args, model.num_layers)
    started = time.perf_counter()
    runs = measure(model, configs, prompts, args.new_tokens, args.warmup)
    rows = [summarize(name, config_runs) for name, config_runs in runs.items()]
    print_table(rows)
    if args.json:
        doc = {
            "command": [sys.executable, *sys.argv],
            "settings": vars(args) | {"prompt_source": bench.prompt_source},
            "machine": {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "model": model.config.to_dict(),
            "wall_seconds": time.perf_counter() - started,
            "results": rows,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def measure(model, configs: dict[str, object], prompts: list[list[int]], new_tokens: int,
            warmup: int) -> dict[str, list[dict]]:
    """Every config on every prompt, back to back in rotating order; the first warmup prompts untimed."""
    names = list(configs)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i, prompt in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        results = {name: configs[name].generate(model, prompt, new_tokens) for name in order}
        if i < warmup:
            continue
        for name, r in results.items():
            runs[name].append({"ms_per_token": r.ms_per_token, "tokens": r.tokens, "stats": r.stats,
                               "speedup": results["ar"].seconds / r.seconds,
                               "identical": r.tokens == results["ar"].tokens})
        print(f"\rprompt {i + 1 - warmup}/{len(prompts) - warmup}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return runs


def summarize(name: str, runs: list[dict]) -> dict:
    """Medians over prompts; acceptance pooled over all rounds."""
    drafted = sum(r["stats"].get("drafted_tokens", 0) for r in runs)
    accepted = sum(r["stats"].get("accepted_tokens", 0) for r in runs)
    rounds = sum(r["stats"].get("rounds", 0) for r in runs)
    return {
        "config": name,
        "ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
        "speedup": statistics.median(r["speedup"] for r in runs),
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_per_round": accepted / rounds if rounds else None,
        "identical_to_ar": sum(r["identical"] for r in runs) / len(runs),
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<36} {'ms/token':>9} {'speed-up':>9} {'accept':>7} {'acc/round':>9} {'== AR':>6}")
    for row in rows:
        acc = "" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.3f}"
        per = "" if row["mean_accepted_per_round"] is None else f"{row['mean_accepted_per_round']:.2f}"
        print(f"{row['config']:<36} {row['ms_per_token']:>9.3f} {row['speedup']:>8.2f}x {acc:>7} {per:>9} "
              f"{100 * row['identical_to_ar']:>5.0f}%")


if __name__ == "__main__":
    raise SystemExit(run_script(main, "decode_speed.py"))

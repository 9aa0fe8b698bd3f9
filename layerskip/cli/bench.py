"""Benchmark AR, dynamic early exit (DEE) and self-speculative decoding (SSD) -> results.json.

The same seeded prompts (the first --prompt_tokens tokens of random paragraphs of the
WikiText-2 test split) are decoded by every config of each model: AR greedy (the reference)
and sampled; DEE with calibrated thresholds (--thresholds) and a sweep of global thresholds
per confidence measure; SSD for every draft layer E and draft length k (greedy), and one
sampled SSD config. Per config: median tokens/s, ms/token and time to first token, speed-up
over the same model's AR, acceptance rate and accepted-length histogram, exit layers, blocks
and head evaluations per token, fidelity to AR greedy (token agreement, ROUGE-L), perplexity
of the generated text under the full model, and peak memory (GPU). Plus the per-layer
evaluation of each model, where one decoding step's time goes (a block, the heads, a
confidence check, propagation; layerskip.costs) with the speed-up that cost model predicts
for each softmax DEE config, sample generations, the machine, versions and this command.

Timing: warm-up runs first, then configs interleaved per prompt, time.perf_counter around
each generation, medians. Draw the tables and plots with `layerskip report`.

example:
  layerskip bench --checkpoint runs/layerskip --baseline runs/plain \\
      --thresholds runs/layerskip/thresholds.json --out results.json
"""

from __future__ import annotations

import argparse
import sys

from layerskip.cli.common import add_checkpoint_arg, add_data_dir_arg, add_device_arg, add_dtype_arg, add_flag
from layerskip.config import GLOBAL_MEASURES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arg(parser)
    parser.add_argument("--baseline", default=None, help="a plain (non-LayerSkip) checkpoint to compare with")
    parser.add_argument("--thresholds", nargs="+", default=None, metavar="FILE",
                        help="thresholds.json files from `layerskip calibrate`, each a calibrated DEE config (several "
                        "compare deltas or measures in one run; the first is the report's featured DEE)")
    parser.add_argument("--out", default="results.json", help="where to write the results (default: results.json)")
    add_flag(parser, "num_prompts", type=int, default=16, help="prompts from the test split (default: 16)")
    add_flag(parser, "prompt_tokens", type=int, default=32, help="tokens per prompt (default: 32)")
    add_flag(parser, "new_tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    add_flag(parser, "draft_layers", type=int, nargs="+", default=None,
             help="SSD draft layers E to sweep (default: a spread over 1..L-1)")
    add_flag(parser, "ks", type=int, nargs="+", default=[2, 4, 6], help="SSD draft lengths k to sweep (default: 2 4 6)")
    add_flag(parser, "dee_measures", nargs="+", default=list(GLOBAL_MEASURES), choices=GLOBAL_MEASURES,
             help="DEE confidence measures to sweep with global thresholds (default: all but classifier, which "
             "needs --thresholds FILE)")
    add_flag(parser, "dee_thresholds", type=float, nargs="+", default=None,
             help="global DEE thresholds to sweep for every measure (default: a per-measure set)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="temperature of the sampled AR and SSD configs (default: 0.8; 0 skips them)")
    add_flag(parser, "sample_draft_layer", type=int, default=None,
             help="draft layer E of the sampled SSD config (default: the middle of --draft_layers)")
    add_flag(parser, "sample_k", type=int, default=None, help="draft length k of the sampled SSD config (default: the middle of --ks)")
    add_flag(parser, "repeats", type=int, default=1, help="timed passes over the prompts (default: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per config (default: 1)")
    add_flag(parser, "draft_vocab", type=int, default=None,
             help="SSD drafts through a short head of the N most frequent training tokens (default: the full head)")
    add_flag(parser, "exit_vocab", type=int, default=None,
             help="the DEE sweep's early exits read a short head of N tokens (a calibrated file brings its own) "
             "(default: the full head)")
    add_flag(parser, "num_samples", type=int, default=3, help="prompts whose generations go in the report (default: 3)")
    add_flag(parser, "eval_tokens", type=int, default=None,
             help="per-layer evaluation on the first N test tokens (default: the whole split, so word "
                  "perplexity is reported; 0 skips it)")
    add_flag(parser, "cost_repeats", type=int, default=300,
             help="timed repetitions of each piece of a decoding step (block, heads, check, propagation) for "
                  "the step-cost breakdown and DEE's estimated speed-ups (default: 300; 0 skips them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and sampling (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads while decoding (default: by each model's size, "
                        "layerskip.device.decoding_threads, as `layerskip generate`)")
    add_data_dir_arg(parser)
    add_device_arg(parser)
    add_dtype_arg(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from layerskip.bench import BenchSettings, run_bench, write_results

    settings = BenchSettings(
        num_prompts=args.num_prompts, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        seed=args.seed, repeats=args.repeats, warmup=args.warmup,
        draft_layers=tuple(args.draft_layers) if args.draft_layers else None, ks=tuple(args.ks),
        dee_measures=tuple(args.dee_measures),
        dee_thresholds=tuple(args.dee_thresholds) if args.dee_thresholds else None,
        temperature=args.temperature, sample_draft_layer=args.sample_draft_layer, sample_k=args.sample_k,
        num_samples=args.num_samples, eval_tokens=args.eval_tokens, draft_vocab=args.draft_vocab,
        exit_vocab=args.exit_vocab, cost_repeats=args.cost_repeats,
        device=args.device, dtype=args.dtype, threads=args.threads,
    )
    results = run_bench(args.checkpoint, baseline=args.baseline, thresholds=args.thresholds, data_dir=args.data_dir,
                        settings=settings, progress=not args.quiet)
    path = write_results(results, args.out)
    for model in results["models"]:
        print(f"layerskip bench: {summary_line(model)}", file=sys.stderr)
    print(path)
    return 0


def summary_line(model: dict) -> str:
    """AR's speed and the fastest greedy DEE/SSD config of one model's results."""
    ar = next(c for c in model["configs"] if c["id"] == "ar")
    line = f"{model['name']}: AR greedy {ar['tokens_per_second']:.1f} tokens/s"
    greedy = [c for c in model["configs"] if c["strategy"] != "ar" and c["greedy"] and c["speedup"] is not None]
    if greedy:
        best = max(greedy, key=lambda c: c["speedup"])
        line += f"; fastest greedy: {best['label']} {best['speedup']:.2f}x (ROUGE-L {best['rouge_l']:.3f})"
    return line

"""Which tokens a cheap check lets exit: per-layer exit shares at a disagreement bound, measure by measure.

    python benchmarks/exit_shares.py --checkpoint runs/layerskip --deltas 0.01 0.05 --out shares.json

For each configuration (a confidence measure and the exit head it reads), per exit layer l:

- calibrated: the policy `layerskip calibrate` would write (Learn-then-Test on the validation
  split, the same code: exit_scores then calibrate_scores, epsilon 0.05, seed 0): the share
  of its held-out test-half tokens that exit after at most l blocks, at each delta;
- ranked: on the first --test_tokens of the test split, the largest share of tokens that
  layer l alone could exit, confidence ranked, with at most delta disagreement among those it
  exits (an upper bound of what that layer's confidence can see; the classifier is the one the
  calibration fit on the validation learn half).

Also the check's cost against a block (layerskip.costs, one thread): the softmax check
through each short head and the classifier's check.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from layerskip.calibration import calibrate_scores, exit_scores
from layerskip.checkpoint import load_checkpoint
from layerskip.costs import measure_step_costs
from layerskip.data import load_corpus
from layerskip.errors import run_script

# name -> (measure, exit_vocab, classifier hidden units)
CONFIGS = {
    "softmax": ("softmax", None, 0), "softmax@1024": ("softmax", 1024, 0), "softmax@512": ("softmax", 512, 0),
    "softmax@256": ("softmax", 256, 0), "saturation": ("saturation", None, 0),
    "classifier": ("classifier", None, 32), "classifier-logistic": ("classifier", None, 0),
    "classifier@256": ("classifier", 256, 32),  # exits through the check's own short head
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--deltas", nargs="+", type=float, default=[0.01, 0.05])
    p.add_argument("--max_tokens", type=int, default=None, help="validation tokens (default: all)")
    p.add_argument("--test_tokens", type=int, default=32768, help="test-split tokens the ranked shares read")
    p.add_argument("--classifier_vocab", type=int, default=256)
    p.add_argument("--cost_repeats", type=int, default=1000, help="timed repetitions per piece (0: skip costs)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def ranked_shares(confidence: np.ndarray, agree: np.ndarray, delta: float) -> list[float]:
    """Per layer: the largest share of tokens, by falling confidence, whose disagreement is <= delta."""
    shares = []
    for conf, ok in zip(confidence, agree):
        wrong = np.cumsum(~ok[np.argsort(-conf, kind="stable")])
        fine = np.nonzero(wrong <= delta * np.arange(1, len(wrong) + 1))[0]
        shares.append(float((fine[-1] + 1) / len(wrong)) if fine.size else 0.0)
    return shares


def run_config(model, valid, test, name: str, deltas, args, cache: dict) -> dict:
    measure, exit_vocab, hidden = CONFIGS[name]
    key = (measure, exit_vocab)
    start = time.perf_counter()
    if key not in cache:
        cache[key] = exit_scores(model, valid, measure, exit_vocab=exit_vocab, max_tokens=args.max_tokens,
                                 classifier_vocab=args.classifier_vocab)
    scored = time.perf_counter() - start
    result = {"measure": measure, "exit_vocab": exit_vocab, "classifier_hidden": hidden, "calibrated": {}}
    classifier = None
    for delta in deltas:
        t0 = time.perf_counter()
        cal = calibrate_scores(cache[key], delta=delta, epsilon=0.05, classifier_hidden=hidden)
        counts = np.cumsum(cal.exit_layer_counts[:-1]) / cal.test_tokens
        result["calibrated"][f"{delta:g}"] = {
            "exit_by_layer": counts.tolist(), "test_risk": cal.test_risk, "test_tokens": cal.test_tokens,
            "mean_exit_layer": cal.mean_exit_layer, "method": cal.method, "seconds": time.perf_counter() - t0}
        classifier = cal.classifier
    held = exit_scores(model, test, measure, exit_vocab=exit_vocab, max_tokens=args.test_tokens,
                       classifier=classifier)
    result["ranked"] = {f"{d:g}": ranked_shares(held.confidence, held.agree, d) for d in deltas}
    result["valid_tokens"], result["scoring_seconds"] = cache[key].num_tokens, scored
    return result


def table(results: dict, kind: str, delta: str, num_layers: int) -> str:
    head = "| config | " + " | ".join(f"layer {layer}" for layer in range(1, num_layers)) + " |"
    rows = [head, "|" + " --- |" * num_layers]
    for name, r in results.items():
        values = r["calibrated"][delta]["exit_by_layer"] if kind == "calibrated" else r["ranked"][delta]
        rows.append(f"| {name} | " + " | ".join(f"{v:.1%}" for v in values) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint, device=torch.device("cpu"))
    corpus = load_corpus(args.data_dir, tokenizer=ckpt.tokenizer)
    model, cache, results = ckpt.model, {}, {}
    for name in args.configs:
        results[name] = run_config(model, corpus.tokens["valid"], corpus.tokens["test"], name, args.deltas, args, cache)
        print(f"{name}: done ({results[name]['scoring_seconds']:.0f} s scoring)", flush=True)
    costs = {}
    if args.cost_repeats:
        for vocab, hidden in ((1024, 32), (512, 0), (256, None)):
            c = measure_step_costs(model, check_vocab=vocab, repeats=args.cost_repeats,
                                   classifier_vocab=None if hidden is None else args.classifier_vocab,
                                   classifier_hidden=hidden)
            costs[f"softmax@{vocab}"] = c.check / c.block
            if c.classifier_check is not None:
                costs[f"classifier@{args.classifier_vocab} (hidden {hidden})"] = c.classifier_check / c.block
            costs[f"block_us (softmax@{vocab} run)"] = c.block
    for delta in (f"{d:g}" for d in args.deltas):
        print(f"\ncalibrated (delta {delta}): held-out tokens exiting by each layer\n"
              + table(results, "calibrated", delta, model.num_layers))
        print(f"\nranked (delta {delta}): test tokens each layer alone could exit\n"
              + table(results, "ranked", delta, model.num_layers))
    print("\ncheck cost in blocks: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items() if "block_us" not in k))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"results": results, "check_cost_blocks": costs, "checkpoint": str(ckpt.path)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "exit_shares.py"))

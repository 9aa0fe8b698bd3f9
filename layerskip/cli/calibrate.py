"""Calibrate dynamic-early-exit thresholds on the validation split, with a stated guarantee.

One teacher-forced pass with every exit over validation windows (never the test split)
gives each layer's confidence and top-1 for every token. Learn-then-Test with
fixed-sequence testing then picks the lowest thresholds whose per-token disagreement with
the full model's top-1 is <= delta with probability >= 1 - epsilon (binomial tail bound),
controlled over the whole exit policy. The file records the per-layer thresholds, the
measure, delta, epsilon, the data used, the measured risk (teacher-forced on the held-out
half, and on DEE's own generations) and the model's fingerprint.

examples:
  layerskip calibrate --checkpoint runs/layerskip --output runs/layerskip/thresholds.json \\
      --delta 0.01 --epsilon 0.05 --measure softmax
  layerskip calibrate --checkpoint runs/layerskip --evaluate runs/layerskip/thresholds.json --split test
"""

from __future__ import annotations

import argparse
import shlex
import sys

from layerskip.config import MEASURES
from layerskip.cli.common import add_checkpoint_arg, add_data_dir_arg, add_device_arg, add_flag



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arg(parser)
    add_flag(parser, "output", default=None, help="where to write thresholds.json")
    add_flag(parser, "evaluate", default=None, metavar="FILE",
             help="instead of calibrating, measure an existing thresholds.json on --split (teacher-forced "
             "disagreement, exit layers, generated-text check) and print it as JSON")
    add_flag(parser, "split", choices=("valid", "test"), default="valid",
             help="the split --evaluate reads (calibration always uses valid)")
    add_flag(parser, "delta", type=float, default=0.01,
             help="risk bound: tolerated per-token disagreement with the full model (default 0.01)")
    add_flag(parser, "epsilon", type=float, default=0.05,
             help="the guarantee holds with probability >= 1 - epsilon (default 0.05)")
    add_flag(parser, "measure", choices=MEASURES, default="softmax",
             help="confidence measure: softmax maximum, top-1 minus top-2 margin, or hidden-state "
             "saturation (cosine of consecutive layers; needs no LM head) (default softmax)")
    add_flag(parser, "method", choices=("auto", "per-layer", "global"), default="auto",
             help="the family of policies tested: per-layer thresholds learnt on half the windows, one "
             "global threshold, or auto: whichever exits earlier on the learn half (default auto)")
    add_flag(parser, "exit_vocab", type=int, default=None,
             help="early exits read a short head of the N most frequent training tokens (cheaper than the "
             "full head; the guarantee covers it; N >= the vocabulary is the full head) (default: the full head)")
    add_flag(parser, "min_exit_layer", type=int, default=1, help="first layer allowed to exit (default 1)")
    add_flag(parser, "check_every", type=int, default=1,
             help="check every k-th layer from min_exit_layer, to save LM-head evaluations (default 1)")
    add_data_dir_arg(parser)
    add_flag(parser, "max_tokens", type=int, default=None,
             help="use at most this many validation tokens (default: the whole split)")
    add_flag(parser, "seq_len", type=int, default=None, help="window length (default: the model's context)")
    add_flag(parser, "batch_size", type=int, default=8, help="windows per forward pass (default 8)")
    add_flag(parser, "gen_prompts", type=int, default=8,
             help="validation prompts for the generated-text disagreement check (0: skip; default 8)")
    add_flag(parser, "gen_tokens", type=int, default=32, help="new tokens per check prompt (default 32)")
    add_flag(parser, "seed", type=int, default=0, help="seed of the learn/test split of windows (default 0)")
    add_flag(parser, "threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from layerskip.checkpoint import load_checkpoint
    from layerskip.data import load_corpus
    from layerskip.errors import ConfigError
    from layerskip.device import resolve_device

    check_args(args)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    corpus = load_corpus(args.data_dir, tokenizer=ckpt.tokenizer)
    if args.evaluate is not None:
        return evaluate(args, ckpt, corpus)
    if args.split != "valid":
        raise ConfigError("calibration reads only the validation split; --split is for --evaluate")
    return calibrate(args, ckpt, corpus, device)


def check_args(args: argparse.Namespace) -> None:
    from layerskip import calibrate as cal
    from layerskip.errors import ConfigError

    if (args.output is None) == (args.evaluate is None):
        raise ConfigError("give --output FILE (calibrate) or --evaluate FILE (check a thresholds file), one of them")
    cal.check_risk_settings(args.delta, args.epsilon)
    for name in ("max_tokens", "seq_len", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    for name in ("gen_prompts", "gen_tokens"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def calibrate(args: argparse.Namespace, ckpt, corpus, device) -> int:
    from layerskip import calibrate as cal
    from layerskip.generate.dee import DynamicEarlyExit

    model = ckpt.model
    DynamicEarlyExit(0.0, args.measure, args.min_exit_layer, args.check_every,
                     exit_vocab=args.exit_vocab).checked_layers(model.num_layers)
    valid = corpus.tokens["valid"]  # calibration never reads the test split
    head = "the full head" if args.exit_vocab is None else f"a {args.exit_vocab}-token short head"
    cal.log(f"calibrate: {min(len(valid), args.max_tokens or len(valid)):,} validation tokens, "
            f"{model.num_layers} layers, measure {args.measure}, exits through {head}, delta {args.delta:g}, "
            f"epsilon {args.epsilon:g}")
    scores = cal.exit_scores(model, valid, args.measure, seq_len=args.seq_len, batch_size=args.batch_size,
                             max_tokens=args.max_tokens, progress=_progress, exit_vocab=args.exit_vocab)
    result = cal.calibrate_scores(scores, delta=args.delta, epsilon=args.epsilon, method=args.method,
                                  min_exit_layer=args.min_exit_layer, check_every=args.check_every, seed=args.seed)
    generated = _generated(args, model, DynamicEarlyExit(result.thresholds, result.measure,
                                                         exit_vocab=result.exit_vocab), valid)
    data = {"split": "valid", "data_dir": str(corpus.data_dir), "tokens": scores.num_tokens,
            "windows": scores.num_windows, "seq_len": scores.seq_len, "max_tokens": args.max_tokens}
    model_info = {"fingerprint": cal.model_fingerprint(model), "num_layers": model.num_layers,
                  "checkpoint": str(ckpt.path), "device": str(device)}
    record = cal.thresholds_record(result, data=data, model_info=model_info, generated=generated,
                                   command=_command(args))
    path = cal.write_json_atomic(args.output, record)
    shown = ", ".join("-" if t is None else f"{t:.4g}" for t in record["thresholds"])
    cal.log(f"thresholds (layers 1..{model.num_layers - 1}; - never exits): {shown} [{result.method}]")
    cal.log(f"held-out teacher-forced disagreement {result.test_risk:.4%} on {result.test_tokens:,} tokens "
            f"(bound {args.delta:g} at 1-epsilon {1 - args.epsilon:g}); mean exit layer {result.mean_exit_layer:.2f}, "
            f"LM-head evaluations per token {result.head_evals_per_token:.2f}")
    if generated.get("new_tokens"):
        cal.log(f"on DEE's own generations: disagreement {generated['disagreement']:.2%}, mean exit layer "
                f"{generated['mean_exit_layer']:.2f} ({generated['new_tokens']} tokens; not covered by the guarantee)")
    if result.chosen_index < 0:
        cal.log("no exit threshold passed the test: every threshold is null, so DEE equals the full model")
    print(path)
    return 0


def evaluate(args: argparse.Namespace, ckpt, corpus) -> int:
    """Teacher-forced disagreement and exit depth of an existing thresholds file on a split, as JSON."""
    import json

    from layerskip import calibrate as cal

    model = ckpt.model
    loaded = cal.load_thresholds(args.evaluate, model.num_layers, fingerprint=cal.model_fingerprint(model))
    tokens = corpus.tokens[args.split]
    scores = cal.exit_scores(model, tokens, loaded.measure, seq_len=args.seq_len, batch_size=args.batch_size,
                             max_tokens=args.max_tokens, progress=_progress, exit_vocab=loaded.exit_vocab)
    wrong, exits = cal.policy_disagreements(scores, loaded.thresholds)
    report = {
        "thresholds_file": str(loaded.path), "split": args.split, "tokens": scores.num_tokens,
        "measure": loaded.measure, "exit_vocab": loaded.exit_vocab, "delta": loaded.delta, "epsilon": loaded.epsilon,
        "teacher_forced_disagreement": wrong / scores.num_tokens, "disagreements": wrong,
        "mean_exit_layer": float(exits.mean()),
        "head_evals_per_token": float(cal.head_evals(exits, loaded.thresholds, loaded.measure).mean()),
        "exit_layer_counts": [int((exits == layer).sum()) for layer in range(1, model.num_layers + 1)],
        "generated_text": _generated(args, model, loaded.strategy(), tokens),
        "command": _command(args),
    }
    print(json.dumps(report, indent=2))
    return 0


def _generated(args: argparse.Namespace, model, dee, tokens) -> dict:
    from layerskip import calibrate as cal

    if not (args.gen_prompts and args.gen_tokens):
        return {}
    return cal.generated_disagreement(model, dee, tokens, num_prompts=args.gen_prompts, new_tokens=args.gen_tokens)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this calibration (every setting spelled out)."""
    parts = ["layerskip", "calibrate"]
    for name in ("checkpoint", "output", "evaluate", "split", "delta", "epsilon", "measure", "method", "min_exit_layer", "check_every",
                 "data_dir", "max_tokens", "seq_len", "batch_size", "gen_prompts", "gen_tokens", "seed", "threads",
                 "device"):
        value = getattr(args, name, None)
        if value is not None:
            parts += [f"--{name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _progress(done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"\r  exit scores: {done}/{total} batches", end="\n" if done == total else "", file=sys.stderr, flush=True)

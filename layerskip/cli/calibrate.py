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
  layerskip calibrate --checkpoint runs/layerskip --output runs/layerskip/thresholds-clf.json \\
      --measure classifier --delta 0.01
  layerskip calibrate --checkpoint runs/layerskip --evaluate runs/layerskip/thresholds.json --split test
"""

from __future__ import annotations

import argparse
import json
import shlex

from layerskip.cli.common import add_checkpoint_arg, add_data_dir_arg, add_device_arg, add_dtype_arg, add_flag
from layerskip.config import MEASURES

# The classifier's settings and their defaults (layerskip.calibration.classifier, decoding.measures), kept
# here so that `layerskip calibrate --help` imports no torch.
CLASSIFIER_VOCAB, DEFAULT_HIDDEN, FIT_TOKENS = 256, 32, 65536
CLASSIFIER_DEFAULTS = {"classifier_vocab": CLASSIFIER_VOCAB, "classifier_hidden": DEFAULT_HIDDEN,
                       "classifier_fit_tokens": FIT_TOKENS}


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
             help="confidence measure: softmax maximum, top-1 minus top-2 margin, hidden-state "
             "saturation (cosine of consecutive layers; needs no LM head), or classifier (CALM's learned exit "
             "classifier, fit on the learn half and written into the file) (default softmax)")
    add_flag(parser, "method", choices=("auto", "per-layer", "global"), default="auto",
             help="the family of policies tested: per-layer thresholds learnt on half the windows, one "
             "global threshold, or auto: whichever exits earlier on the learn half (default auto)")
    add_flag(parser, "exit_vocab", type=int, default=None,
             help="early exits read a short head of the N most frequent training tokens (cheaper than the "
             "full head; the guarantee covers it; N >= the vocabulary is the full head) (default: the full head)")
    add_flag(parser, "classifier_vocab", type=int, default=CLASSIFIER_VOCAB,
             help="--measure classifier: tokens in the short head whose largest probability is one of the "
             f"classifier's features (default {CLASSIFIER_VOCAB})")
    add_flag(parser, "classifier_hidden", type=int, default=DEFAULT_HIDDEN,
             help="--measure classifier: hidden units of its one-hidden-layer MLP; 0 is logistic regression "
             f"(default {DEFAULT_HIDDEN})")
    add_flag(parser, "classifier_fit_tokens", type=int, default=FIT_TOKENS,
             help=f"--measure classifier: learn-half tokens each layer's classifier is fit on, at most (default "
             f"{FIT_TOKENS})")
    add_flag(parser, "min_exit_layer", type=int, default=1, help="first layer allowed to exit (default 1)")
    add_flag(parser, "check_every", type=int, default=1,
             help="check every k-th layer from min_exit_layer, to save LM-head evaluations (default 1)")
    add_flag(parser, "select_layers", choices=("cost", "all"), default="cost",
             help="cost: check only the layers whose checks save more than they cost (chosen on the learn half, "
             "so the guarantee stands); all: every layer --min_exit_layer and --check_every allow (default cost)")
    add_flag(parser, "check_cost", type=float, default=None,
             help="--select_layers cost: one check's cost in blocks, as measured (e.g. layerskip report's 'where a "
             "step's time goes') (default: estimated from the weights each reads)")
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
    add_dtype_arg(parser)


def run(args: argparse.Namespace) -> int:
    from layerskip.api import calibrate, load
    from layerskip.calibration import evaluate_thresholds

    check_args(args)
    shared = {name: getattr(args, name) for name in ("data_dir", "max_tokens", "seq_len", "batch_size", "gen_prompts",
                                                     "gen_tokens", "device")}
    if args.evaluate is not None:
        ckpt = load(args.checkpoint, device=args.device, dtype=args.dtype)
        report = evaluate_thresholds(ckpt, args.evaluate, split=args.split, command=_command(args), **shared)
        print(json.dumps(report, indent=2))
        return 0
    policy = calibrate(
        args.checkpoint, output=args.output, delta=args.delta, epsilon=args.epsilon, measure=args.measure,
        method=args.method, exit_vocab=args.exit_vocab, min_exit_layer=args.min_exit_layer,
        check_every=args.check_every, seed=args.seed, classifier_vocab=args.classifier_vocab,
        classifier_hidden=args.classifier_hidden, classifier_fit_tokens=args.classifier_fit_tokens,
        select_layers=args.select_layers, check_cost=args.check_cost, command=_command(args), dtype=args.dtype,
        **shared,
    )
    print(policy.path)
    return 0


def check_args(args: argparse.Namespace) -> None:
    from layerskip.calibration.pipeline import check_counts
    from layerskip.errors import ConfigError
    from layerskip.thresholds import check_risk_settings

    if (args.output is None) == (args.evaluate is None):
        raise ConfigError("give --output FILE (calibrate) or --evaluate FILE (check a thresholds file), one of them")
    check_risk_settings(args.delta, args.epsilon)
    check_counts({name: getattr(args, name) for name in ("max_tokens", "seq_len", "batch_size", "threads",
                                                         "gen_prompts", "gen_tokens")}, prefix="--")
    if args.evaluate is None and args.split != "valid":
        raise ConfigError("calibration reads only the validation split; --split is for --evaluate")
    changed = [f"--{name}" for name, default in CLASSIFIER_DEFAULTS.items() if getattr(args, name) != default]
    if changed and (args.measure != "classifier" or args.evaluate is not None):
        raise ConfigError(f"{', '.join(changed)} only apply when calibrating with --measure classifier "
                          "(a thresholds file already holds its classifier)")
    if args.check_cost is not None and (args.select_layers != "cost" or args.evaluate is not None):
        raise ConfigError("--check_cost weighs checks for --select_layers cost when calibrating; drop it")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this calibration (every setting spelled out)."""
    parts = ["layerskip", "calibrate"]
    classifier = list(CLASSIFIER_DEFAULTS) if args.measure == "classifier" and args.evaluate is None else []
    selection = ["select_layers", "check_cost"] if args.evaluate is None else []
    for name in ("checkpoint", "output", "evaluate", "split", "delta", "epsilon", "measure", "method", "exit_vocab",
                 *classifier, "min_exit_layer", "check_every", *selection, "data_dir", "max_tokens", "seq_len",
                 "batch_size", "gen_prompts", "gen_tokens", "seed", "threads", "device", "dtype"):
        value = getattr(args, name, None)
        if value is not None:
            parts += [f"--{name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


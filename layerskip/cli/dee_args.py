"""Command-line options of dynamic early exit, shared by `generate --mode dee` (and anyone else).

``add_dee_arguments(parser)`` adds the flags (argparse only, no torch import);
``build_dee(args, model)`` turns them into a ``DynamicEarlyExit``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from layerskip.config import MEASURES
from layerskip.cli.common import add_flag

DEFAULT_CONF = 0.9  # the seed study's default global threshold


def add_dee_arguments(parser: argparse._ActionsContainer) -> None:
    group = parser.add_argument_group("dynamic early exit (--mode dee)")
    add_flag(group, "conf", type=float, default=None,
             help=f"one confidence threshold for every layer (default {DEFAULT_CONF} unless --thresholds is given); "
             "above 1 never exits, 0 always exits at --min_exit_layer")
    group.add_argument("--thresholds", "--lam_file", "--lam-file", dest="thresholds", default=None, metavar="FILE",
                       help="per-layer thresholds from `layerskip calibrate` (thresholds.json); refused when "
                       "made for another model or measure")
    add_flag(group, "measure", choices=MEASURES, default=None,
             help="confidence measure: softmax maximum, top-1 minus top-2 margin, or saturation (cosine of "
             "consecutive hidden states, needs no LM head) (default: the file's, else softmax)")
    add_flag(group, "exit_vocab", type=int, default=None,
             help="early exits read a short head of the N most frequent training tokens, much cheaper than "
             "the full head (default: the file's, else the full head)")
    add_flag(group, "min_exit_layer", type=int, default=None,
             help="the first layer a token may exit at (default: the file's, else 1)")
    add_flag(group, "check_every", type=int, default=None,
             help="check only every k-th layer from --min_exit_layer, saving LM-head evaluations "
             "(default: the file's, else 1)")


def build_dee(args: argparse.Namespace, model: Any):
    """The DynamicEarlyExit the flags describe; a thresholds file's settings are the defaults."""
    from layerskip.errors import ConfigError
    from layerskip.generate.dee import DynamicEarlyExit

    conf = getattr(args, "conf", None)
    path = getattr(args, "thresholds", None)
    measure = getattr(args, "measure", None)
    min_exit = getattr(args, "min_exit_layer", None)
    every = getattr(args, "check_every", None)
    vocab = getattr(args, "exit_vocab", None)
    if conf is not None and path is not None:
        raise ConfigError("give either --conf (one global threshold) or --thresholds FILE, not both")
    if path is None:
        return DynamicEarlyExit(
            DEFAULT_CONF if conf is None else conf,
            measure or "softmax",
            1 if min_exit is None else min_exit,
            1 if every is None else every,
            exit_vocab=vocab,
        )
    from layerskip.thresholds import load_thresholds, model_fingerprint

    loaded = load_thresholds(path, model.num_layers, measure, fingerprint=model_fingerprint(model))
    changed = [f"--{name} {value} (calibrated with {calibrated})"
               for name, value, calibrated in (("min_exit_layer", min_exit, loaded.min_exit_layer),
                                                ("check_every", every, loaded.check_every),
                                                ("exit_vocab", vocab, loaded.exit_vocab))
               if value is not None and value != calibrated]
    if changed:
        print(f"warning: {', '.join(changed)}: the guarantee in {path} holds only for the policy it was "
              "calibrated for", file=sys.stderr)
    return DynamicEarlyExit(
        loaded.thresholds,
        loaded.measure,
        loaded.min_exit_layer if min_exit is None else min_exit,
        loaded.check_every if every is None else every,
        exit_vocab=loaded.exit_vocab if vocab is None else vocab,
    )

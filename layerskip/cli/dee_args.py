"""Command-line options of dynamic early exit, shared by `generate --mode dee` (and anyone else).

``add_dee_arguments(parser)`` adds the flags (argparse only, no torch import);
``dee_options(args)`` turns them into ``layerskip.api.generate`` options.
"""

from __future__ import annotations

import argparse
from typing import Any

from layerskip.api import DEFAULT_CONF
from layerskip.cli.common import add_flag
from layerskip.config import MEASURES


def add_dee_arguments(parser: argparse._ActionsContainer) -> None:
    group = parser.add_argument_group("dynamic early exit (--mode dee)")
    add_flag(group, "conf", type=float, default=None,
             help=f"one confidence threshold for every layer (default {DEFAULT_CONF} unless --thresholds is given); "
             "above 1 never exits, 0 always exits at --min_exit_layer")
    group.add_argument("--thresholds", "--lam_file", "--lam-file", dest="thresholds", default=None, metavar="FILE",
                       help="per-layer thresholds from `layerskip calibrate` (thresholds.json); refused when "
                       "made for another model or measure")
    add_flag(group, "measure", choices=MEASURES, default=None,
             help="confidence measure: softmax maximum, top-1 minus top-2 margin, saturation (cosine of "
             "consecutive hidden states, needs no LM head), or classifier (CALM's learned exit classifier; only "
             "with --thresholds from `layerskip calibrate --measure classifier`) (default: the file's, else softmax)")
    add_flag(group, "exit_vocab", type=int, default=None,
             help="early exits read a short head of the N most frequent training tokens, much cheaper than "
             "the full head (default: the file's, else the full head)")
    add_flag(group, "min_exit_layer", type=int, default=None,
             help="the first layer a token may exit at (default: the file's, else 1)")
    add_flag(group, "check_every", type=int, default=None,
             help="check only every k-th layer from --min_exit_layer, saving LM-head evaluations "
             "(default: the file's, else 1)")


def dee_options(args: argparse.Namespace) -> dict[str, Any]:
    """The DEE flags as options of ``layerskip.api.generate`` (unset flags are None: the documented defaults)."""
    return {name: getattr(args, name, None)
            for name in ("thresholds", "conf", "measure", "exit_vocab", "min_exit_layer", "check_every")}


def build_dee(args: argparse.Namespace, model: Any):
    """The DynamicEarlyExit the flags describe; a thresholds file's settings are the defaults."""
    from layerskip.api import build_strategy

    return build_strategy(model, "dee", **dee_options(args))

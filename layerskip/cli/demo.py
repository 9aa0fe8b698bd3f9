"""The whole study in one command, from nothing to an HTML report.

Stages (each one an ordinary layerskip command, printed as it starts and recorded in
DIR/demo.json): train a LayerSkip model and a plain baseline for equal shares of the
budget, calibrate two early-exit policies on the validation split (the softmax confidence,
the report's featured DEE, and CALM's learned exit classifier), benchmark AR, DEE and SSD on
test-split prompts (with per-layer evaluation of both models), and write the report.
Re-running skips finished stages and resumes an interrupted training.

example:
  layerskip demo                       # about 20 minutes on 2 CPU cores
  layerskip demo --budget 60 --out runs/demo60
"""

from __future__ import annotations

import argparse
import sys

from layerskip.cli.common import add_data_dir_arg, add_device_arg, add_flag

# Model-size flags forwarded to both trainings unchanged.
MODEL_FLAGS = ("d_model", "num_layers", "num_heads", "d_ff", "seq_len", "vocab_size", "batch_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="directory for the runs, results and report (default runs/demo)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="minutes that scale the study: each of the two trainings gets 36%% of it, and "
                        "calibration + benchmark take the rest (about 5 minutes at the default size) (default 20)")
    add_data_dir_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of training, prompts and sampling (default 0)")
    parser.add_argument("--delta", type=float, default=0.01,
                        help="calibration risk bound: tolerated disagreement with the full model (default 0.01)")
    add_flag(parser, "num_prompts", type=int, default=None, help="benchmark prompts (default 16; --smoke: 2)")
    add_flag(parser, "new_tokens", type=int, default=None,
             help="tokens generated per benchmark prompt (default 64; --smoke: 8)")
    group = parser.add_argument_group("model size (default: the seed study's d128, 6 layers, 8 heads, ff 512)")
    for name in MODEL_FLAGS:
        add_flag(group, name, type=int, default=None)
    add_flag(group, "max_steps", type=int, default=None, help="cap each training at this many steps (--smoke: 20)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the pipeline in about a minute: a tiny model (unless sizes are given), 20 steps, "
                        "no compilation, fp32, one SSD and one DEE setting, short evaluation (numbers are not "
                        "meaningful)")


def run(args: argparse.Namespace) -> int:
    from layerskip.demo import run_demo

    report = run_demo(demo_settings(args))
    print(f"layerskip demo: report at {report} (tables in {report.parent / 'report.md'})", file=sys.stderr)
    print(report)
    return 0


def demo_settings(args: argparse.Namespace):
    """The study the flags describe; --smoke fills in a tiny model and short runs where flags are not given."""
    from pathlib import Path

    from layerskip import demo

    sizes = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    if args.smoke and not sizes:
        sizes = dict(demo.SMOKE_MODEL)
    model_flags = [part for name, value in sizes.items() for part in (f"--{name}", str(value))]
    smoke = {"max_steps": demo.SMOKE_MAX_STEPS, "num_prompts": demo.SMOKE_PROMPTS,
             "new_tokens": demo.SMOKE_NEW_TOKENS} if args.smoke else {}
    defaults = {"max_steps": None, "num_prompts": 16, "new_tokens": 64, **smoke}
    counts = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in defaults.items()}
    settings = demo.DemoSettings(out=Path(args.out), budget_minutes=args.budget, data_dir=args.data_dir,
                                 device=args.device, seed=args.seed, model_flags=model_flags, delta=args.delta,
                                 **counts)
    if args.smoke:
        settings.model_flags += demo.SMOKE_TRAIN_FLAGS
        settings.bench_flags += demo.SMOKE_BENCH_FLAGS
    return settings

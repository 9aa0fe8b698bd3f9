"""The whole study in one command, from nothing to an HTML report.

Stages (each one an ordinary layerskip command, printed as it starts and recorded in
DIR/demo.json): train a LayerSkip model and a plain baseline for equal shares of the
budget, calibrate early-exit thresholds on the validation split, benchmark AR, DEE and SSD
on test-split prompts (with per-layer evaluation of both models), and write the report.
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
                        "calibration + benchmark take the rest (about 5.5 minutes at the default size) (default 20)")
    add_data_dir_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of training, prompts and sampling (default 0)")
    parser.add_argument("--delta", type=float, default=0.01,
                        help="calibration risk bound: tolerated disagreement with the full model (default 0.01)")
    add_flag(parser, "num_prompts", type=int, default=16, help="benchmark prompts (default 16)")
    add_flag(parser, "new_tokens", type=int, default=64, help="tokens generated per benchmark prompt (default 64)")
    group = parser.add_argument_group("model size (default: the seed study's d128, 6 layers, 8 heads, ff 512)")
    for name in MODEL_FLAGS:
        add_flag(group, name, type=int, default=None)
    add_flag(group, "max_steps", type=int, default=None, help="cap each training at this many steps")
    parser.add_argument("--smoke", action="store_true",
                        help="a minimal sweep for checking the pipeline in seconds on tiny models: no compilation, "
                        "fp32, one SSD and one DEE setting, short evaluation (numbers are not meaningful)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerskip.demo import SMOKE_BENCH_FLAGS, SMOKE_TRAIN_FLAGS, DemoSettings, run_demo

    model_flags: list[str] = []
    for name in MODEL_FLAGS:
        value = getattr(args, name)
        if value is not None:
            model_flags += [f"--{name}", str(value)]
    settings = DemoSettings(
        out=Path(args.out), budget_minutes=args.budget, data_dir=args.data_dir, device=args.device, seed=args.seed,
        model_flags=model_flags, max_steps=args.max_steps, delta=args.delta, num_prompts=args.num_prompts,
        new_tokens=args.new_tokens,
    )
    if args.smoke:
        settings.model_flags += SMOKE_TRAIN_FLAGS
        settings.bench_flags += SMOKE_BENCH_FLAGS
    report = run_demo(settings)
    print(f"layerskip demo: report at {report} (tables in {report.parent / 'report.md'})", file=sys.stderr)
    print(report)
    return 0

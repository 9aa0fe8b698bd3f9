"""A LayerSkip recipe search in the open: interleaved trainings at the demo's budget, several seeds each.

    python benchmarks/recipe_search.py --out runs/recipes train      # the trainings (hours)
    python benchmarks/recipe_search.py --out runs/recipes measure    # per-layer eval + exit shares
    python benchmarks/recipe_search.py --out runs/recipes decode --recipes current distill0.5 --seeds 0
    python benchmarks/recipe_search.py --out runs/recipes summary    # the tables (markdown + JSON)

train: every (seed, recipe) pair runs `layerskip train --time_budget MINUTES` (the demo's
share of its 20-minute budget by default), --parallel at a time, each with cores / parallel
torch threads, so runs that share the machine share it equally. The order is seed-major and
each seed rotates the recipes, so no recipe always runs first, last or beside the same one.
A finished run is skipped and an interrupted one resumed, so the command can be re-run. A
continual recipe (CONTINUAL) trains in two stages within the same minutes: its first recipe,
then its own flags from that run (--init-from).

measure: for each run, `layerskip eval` on the test split (per-exit word perplexity and
agreement with the last layer) and benchmarks/exit_shares.py (the share of tokens that can
exit by each layer at a disagreement bound, softmax through the full head; Learn-then-Test
calibrated on the first 65,536 validation tokens, and confidence-ranked on 32,768 test tokens).

decode (machine otherwise idle: it times decoding): for each chosen run, `layerskip calibrate`
per confidence measure (softmax, saturation, classifier; short head of 1,024 tokens) at
delta 1% and 5% (--deltas), then one `layerskip bench` with all those thresholds files and the
same seed's plain run as --baseline, as the demo does.

summary: per recipe, the mean over seeds (and each seed) of the last layer's word
perplexity, agreement at each exit, exit shares at layer 3, and steps trained; for decoded
runs, each calibrated DEE's speed-up, ROUGE-L and held-out disagreement, the fastest DEE sweep
config with ROUGE-L >= 0.8 and the best greedy SSD. Written to OUT/summary.md and OUT/summary.json
(the records and tables: recipe_runs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerskip.demo import PLAIN_FLAGS, TRAIN_SHARE
from layerskip.errors import ConfigError, run_script

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, when imported by path
from recipe_runs import (  # noqa: E402
    DECODE_DELTAS,
    DECODE_MEASURES,
    collect,
    decode_table,
    first_stage_dir,
    run_dir,
    summary_table,
)

# The demo's recipe before the search (spelt out: the defaults it relied on have changed since).
BEFORE = ["--max_skip_prob", "0.2", "--early_exit_scale", "1.0", "--early_exit_curriculum", "rotational",
          "--early_exit_tokens", "0.25", "--early_exit_weighting", "depth", "--early_exit_distill", "0"]
# name -> `layerskip train` flags (later flags override earlier ones). "current" is BEFORE; "paper"
# the LayerSkip paper's from-scratch recipe (exponential depth schedule and time ramp, p_max 0.1, e_scale 0.2).
# The demo's default from the first round until the twelfth (uniform-distill0.9), which the
# rounds between measured their levers on, spelt out as the demo's recipe then was.
DEFAULT = ["--max_skip_prob", "0.2", "--early_exit_scale", "1.0", "--early_exit_curriculum", "rotational",
           "--early_exit_tokens", "0.25", "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9"]
RECIPES: dict[str, list[str]] = {
    "plain": PLAIN_FLAGS,
    "current": BEFORE,
    "distill0.5": [*BEFORE, "--early_exit_distill", "0.5"],
    "distill0.9": [*BEFORE, "--early_exit_distill", "0.9"],
    "distill0.5-T2": [*BEFORE, "--early_exit_distill", "0.5", "--early_exit_distill_temperature", "2"],
    "paper": ["--max_skip_prob", "0.1", "--layer_dropout_schedule", "exp", "--layer_dropout_ramp", "exp",
              "--early_exit_scale", "0.2", "--early_exit_curriculum", "rotational", "--early_exit_tokens", "0.25",
              "--early_exit_weighting", "depth", "--early_exit_distill", "0"],
    "uniform": [*BEFORE, "--early_exit_weighting", "uniform"],
    "uniform-distill0.5": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.5"],
    "uniform-distill0.9": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9"],
    "uniform-distill1.0": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "1.0"],
    "p0.1-uniform-distill0.9": [*BEFORE, "--max_skip_prob", "0.1", "--early_exit_weighting", "uniform",
                                "--early_exit_distill", "0.9"],  # `layerskip train`'s defaults since the search
    "noskip-uniform-distill0.5": [*BEFORE, "--max_skip_prob", "0", "--early_exit_weighting", "uniform",
                                  "--early_exit_distill", "0.5"],
    # the fourth round: the winner with less early-exit loss, or the paper's layer-dropout shape
    "uniform-distill0.9-e0.5": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
                                "--early_exit_scale", "0.5"],
    "uniform-distill0.9-e0.3": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
                                "--early_exit_scale", "0.3"],
    "uniform-distill0.9-exp": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
                               "--layer_dropout_schedule", "exp", "--layer_dropout_ramp", "exp"],
    # the fifth round: both levers of the fourth together
    "uniform-distill0.9-exp-e0.5": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
                                    "--layer_dropout_schedule", "exp", "--layer_dropout_ramp", "exp",
                                    "--early_exit_scale", "0.5"],
    "uniform-distill0.9-exp-e0.3": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
                                    "--layer_dropout_schedule", "exp", "--layer_dropout_ramp", "exp",
                                    "--early_exit_scale", "0.3"],
    # the seventh round: the paper's e_scale (0.2) with the default's loss
    "uniform-distill0.9-e0.2": [*BEFORE, "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
                                "--early_exit_scale", "0.2"],
    # the eighth round: the default with a head only the last layer trains, with its early-exit
    # loss annealed from 1 to 0.2 over the run, and with both
    "default-headfree": [*DEFAULT, "--no-early_exit_trains_head"],
    "default-e1to0.2": [*DEFAULT, "--early_exit_scale_end", "0.2"],
    "default-headfree-e1to0.2": [*DEFAULT, "--no-early_exit_trains_head", "--early_exit_scale_end", "0.2"],
    # the ninth round: early-exit losses at exits 1-3 only, the blocks after them free of their pull
    "default-exits123": [*DEFAULT, "--early_exit_layers", "1", "2", "3"],
    "default-exits123-every": [*DEFAULT, "--early_exit_layers", "1", "2", "3", "--early_exit_curriculum", "none"],
    # the tenth round: exits 1-3 only, with the exit loss annealed as well
    "default-exits123-e1to0.2": [*DEFAULT, "--early_exit_layers", "1", "2", "3", "--early_exit_scale_end", "0.2"],
    # the eleventh round: each early-exit token's loss weighted by the last layer's confidence
    # (p_max^G, mean 1), so the exits train where they could exit and leave hard tokens to the depth
    "default-focus1": [*DEFAULT, "--early_exit_focus", "1"],
    "default-focus3": [*DEFAULT, "--early_exit_focus", "3"],
    # the twelfth round: more layer dropout (cheaper steps; the first round saw p_max 0.2 beat 0.1
    # and 0), and the small levers stacked: exits 1-3 only, more layer dropout, half the exit tokens
    "default-p0.4": [*DEFAULT, "--max_skip_prob", "0.4"],
    "default-exits123-p0.4-t0.125": [*DEFAULT, "--early_exit_layers", "1", "2", "3", "--max_skip_prob", "0.4",
                                     "--early_exit_tokens", "0.125"],
    # the thirteenth round: the stack with still more layer dropout
    "default-exits123-p0.6-t0.125": [*DEFAULT, "--early_exit_layers", "1", "2", "3", "--max_skip_prob", "0.6",
                                     "--early_exit_tokens", "0.125"],
    "default-exits123-p0.8-t0.125": [*DEFAULT, "--early_exit_layers", "1", "2", "3", "--max_skip_prob", "0.8",
                                     "--early_exit_tokens", "0.125"],
    # the sixth round: continual LayerSkip training (the paper's main use) inside the same budget: a
    # plain run first (CONTINUAL's share of the minutes), then the default recipe from it (--init-from)
    # with a short warm-up, at the full or a lower peak LR
    "plain50-then-default": [*DEFAULT, "--warmup", "20"],
    "plain75-then-default": [*DEFAULT, "--warmup", "20"],
    "plain75-then-default-lr3e-3": [*DEFAULT, "--warmup", "20", "--lr", "3e-3"],
}
# name -> (the recipe trained first, its share of the minutes): a continual recipe's flags above train
# the rest of the budget starting from that first run, so both stages together take the same minutes.
CONTINUAL: dict[str, tuple[str, float]] = {
    "plain50-then-default": ("plain", 0.5),
    "plain75-then-default": ("plain", 0.75),
    "plain75-then-default-lr3e-3": ("plain", 0.75),
}
DEMO_MINUTES = 20.0 * TRAIN_SHARE
SHARE_CONFIGS = ["softmax"]  # the full head's softmax, as the 13% at layer 3 was measured
SHARE_VALID_TOKENS = "65536"  # validation tokens the calibrated shares learn from (all: 4x the time)
SHORT_HEAD = "1024"  # the demo's draft and exit head


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "measure", "decode", "summary"])
    p.add_argument("--out", type=Path, required=True, help="directory of the runs: OUT/seedS/RECIPE")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="each training's time budget")
    p.add_argument("--parallel", type=int, default=2, help="trainings at once (each gets cores / parallel threads)")
    p.add_argument("--deltas", nargs="+", default=DECODE_DELTAS,
                   help="decode: the disagreement bounds each measure is calibrated at")
    p.add_argument("--reference", default="current", choices=list(RECIPES),
                   help="summary: the recipe each seed's agreement is compared with (default current)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--train_flags", nargs=argparse.REMAINDER, default=[],
                   help="passed to every training after the recipe's flags (e.g. a model size); must come last")
    args = p.parse_args(argv)
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    return args


def training_order(recipes: list[str], seeds: list[int]) -> list[tuple[int, str]]:
    """Seed-major; seed number i starts its recipes i places further along, so positions rotate."""
    order = []
    for i, seed in enumerate(seeds):
        shift = i % len(recipes)
        order += [(seed, r) for r in recipes[shift:] + recipes[:shift]]
    return order


def train_argv(args: argparse.Namespace, directory: Path, seed: int, flags: list[str], minutes: float) -> list[str]:
    argv = ["train", "--out", str(directory), "--time_budget", f"{minutes:g}", "--seed", str(seed), "--quiet",
            *flags, *args.train_flags]
    if args.data_dir:
        argv += ["--data_dir", args.data_dir]
    if (directory / "last" / "config.json").is_file():
        argv.append("--resume")
    elif directory.exists():
        argv.append("--overwrite")  # a run that never saved
    return argv


def training_stages(args: argparse.Namespace, seed: int, recipe: str) -> list[tuple[Path, list[str]]]:
    """The trainings behind one run, in order: (directory, argv); a continual recipe's first run, then it."""
    if recipe not in CONTINUAL:
        directory = run_dir(args.out, seed, recipe)
        return [(directory, train_argv(args, directory, seed, RECIPES[recipe], args.minutes))]
    first_recipe, share = CONTINUAL[recipe]
    first, directory = first_stage_dir(args.out, seed, recipe), run_dir(args.out, seed, recipe)
    flags = [*RECIPES[recipe], "--init-from", str(first)]
    return [(first, train_argv(args, first, seed, RECIPES[first_recipe], args.minutes * share)),
            (directory, train_argv(args, directory, seed, flags, args.minutes * (1 - share)))]


def shown(argv: list[str]) -> str:
    """A child's command line as a user would type it."""
    words = ["layerskip", *argv[3:]] if argv[1:3] == ["-m", "layerskip"] else ["python", *argv[1:]]
    return " ".join(words)


def finished(directory: Path) -> bool:
    return (directory / "best" / "config.json").is_file() and (directory / "done.json").is_file()


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_trainings(args: argparse.Namespace) -> None:
    jobs = [(s, r) for s, r in training_order(args.recipes, args.seeds) if not finished(run_dir(args.out, s, r))]
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    print(f"{len(jobs)} trainings to run, {args.parallel} at a time, {threads} thread(s) each", flush=True)
    if args.dry_run:
        for seed, recipe in jobs:
            for _, argv in training_stages(args, seed, recipe):
                print("$ " + shown([sys.executable, "-m", "layerskip", *argv]), flush=True)
        return

    def train(job: tuple[int, str]) -> None:
        seed, recipe = job
        started = time.time()
        for directory, argv in training_stages(args, seed, recipe):  # argv decided when the stage starts
            if finished(directory):
                continue
            status = run_stage(directory, recipe, [sys.executable, "-m", "layerskip", *argv], threads, args.parallel)
            if status != 0:
                print(f"seed {seed} {recipe}: exit {status} in {directory.name}", flush=True)
                return
        print(f"seed {seed} {recipe}: done after {time.time() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(train, jobs))


def run_stage(directory: Path, recipe: str, argv: list[str], threads: int, parallel: int) -> int:
    """One training, its output appended to the recipe's log; done.json records it when it succeeds."""
    print("$ " + shown(argv), flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(directory.parent / f"{recipe}.log", "a", encoding="utf-8") as log:
        status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads)).returncode
    if status == 0:
        (directory / "done.json").write_text(
            json.dumps({"seconds": time.time() - started, "threads": threads, "parallel": parallel}))
    return status


def measure(args: argparse.Namespace) -> None:
    """Each run's evaluation and exit shares, --parallel runs at a time (not timed, so sharing is harmless)."""
    here = Path(__file__).resolve().parent
    data = ["--data_dir", args.data_dir] if args.data_dir else []
    jobs = []
    for seed, recipe in training_order(args.recipes, args.seeds):
        directory = run_dir(args.out, seed, recipe)
        if not finished(directory):
            print(f"seed {seed} {recipe}: not trained yet, skipped", flush=True)
            continue
        commands = []
        if not (directory / "eval_test.json").is_file():
            commands.append([sys.executable, "-m", "layerskip", "eval", "--checkpoint", str(directory), "--split",
                             "test", "--json", str(directory / "eval_test.json"), *data])
        if recipe != "plain" and not (directory / "exit_shares.json").is_file():
            commands.append([sys.executable, str(here / "exit_shares.py"), "--checkpoint", str(directory),
                             "--configs", *SHARE_CONFIGS, "--deltas", "0.01", "0.05", "--cost_repeats", "0",
                             "--max_tokens", SHARE_VALID_TOKENS,
                             "--out", str(directory / "exit_shares.json"), *data])
        if commands:
            jobs.append(commands)
    run_jobs(jobs, args.parallel, args.dry_run)


def run_jobs(jobs: list[list[list[str]]], parallel: int, dry_run: bool) -> None:
    """Each job's commands in order, `parallel` jobs at a time, each with cores / parallel threads."""
    for commands in jobs:
        for argv in commands:
            print("$ " + shown(argv), flush=True)
    if dry_run:
        return
    threads = max(1, (os.cpu_count() or 1) // parallel)

    def run_in_order(commands: list[list[str]]) -> None:
        for argv in commands:
            subprocess.run(argv, check=True, env=child_env(threads), stdout=subprocess.DEVNULL)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run_in_order, jobs))  # list(): a failed command raises here


def thresholds_file(directory: Path, measure: str, delta: str) -> Path:
    return directory / f"thresholds-{measure}-{delta}.json"


def decode(args: argparse.Namespace) -> None:
    """Calibrations --parallel at a time (not timed), then each bench alone (timed)."""
    data = ["--data_dir", args.data_dir] if args.data_dir else []
    layerskip = [sys.executable, "-m", "layerskip"]
    calibrations, benches = [], []
    for seed, recipe in training_order(args.recipes, args.seeds):
        directory, plain = run_dir(args.out, seed, recipe), run_dir(args.out, seed, "plain")
        if recipe == "plain" or not finished(directory) or not finished(plain):
            print(f"seed {seed} {recipe}: skipped (plain, or it or its plain run not trained)", flush=True)
            continue
        pairs = [(m, d) for m in DECODE_MEASURES for d in args.deltas]
        files = [thresholds_file(directory, m, d) for m, d in pairs]
        for file, (measure, delta) in zip(files, pairs):
            if not file.is_file():
                calibrations.append([[*layerskip, "calibrate", "--checkpoint", str(directory), "--output", str(file),
                                      "--delta", delta, "--measure", measure, "--exit_vocab", SHORT_HEAD, *data]])
        if not (directory / "results.json").is_file():
            benches.append([[*layerskip, "bench", "--checkpoint", str(directory), "--baseline", str(plain),
                             "--thresholds", *map(str, files), "--out", str(directory / "results.json"),
                             "--seed", str(seed), "--draft_vocab", SHORT_HEAD, "--exit_vocab", SHORT_HEAD, "--quiet",
                             *data]])
    run_jobs(calibrations, args.parallel, args.dry_run)
    run_jobs(benches, 1, args.dry_run)


def write_summary(args: argparse.Namespace) -> None:
    runs = collect(args.out, args.recipes, args.seeds)
    if not runs:
        raise ConfigError(f"no measured runs under {args.out}; run the train and measure phases first")
    text = summary_table(runs, args.reference)
    decoded = decode_table(runs)
    if decoded:
        text += "\n\ndecoding (speed-up over AR / ROUGE-L against AR greedy / held-out disagreement)\n\n" + decoded
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({"runs": runs, "recipes": {r: RECIPES[r] for r in runs},
                                                        "minutes": args.minutes, "command": sys.argv}, indent=2))
    print(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "train":
        run_trainings(args)
    elif args.phase == "measure":
        measure(args)
    elif args.phase == "decode":
        decode(args)
    else:
        write_summary(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "recipe_search.py"))

"""The whole study in one command: a fixed sequence of ordinary `layerskip` commands.

Each stage is exactly a subcommand a user could type (and the demo prints it, and records
it in DIR/demo.json), run in-process through the same CLI. Finished stages are recorded
as they finish, so re-running the demo skips them; an interrupted training stage resumes
from its last checkpoint. Both models get the same share of the time budget, so the
LayerSkip-vs-plain comparison is at equal wall-clock training time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerskip.console import log
from layerskip.errors import ConfigError, LayerskipError
from layerskip.jsonfile import write_json
from layerskip.training.config import TrainConfig

STATE_FILE = "demo.json"
# Shares of the budget: the two trainings get most of it, equally.
TRAIN_SHARE = 0.36
# LayerSkip recipe of the demo (the recipe search's winner, benchmarks/recipe_search.py;
# docs/results.md): heavy layer dropout (the last block skipped 80% of the time: cheaper steps,
# so more of them in the budget), the paper's rotational exit loss on the first half's exits
# only, on an eighth of the tokens, every early exit weighted alike and distilled from the last layer.
def layerskip_flags(num_layers: int) -> list[str]:
    """`layerskip train` flags of the demo's LayerSkip recipe for a model `num_layers` blocks deep."""
    first_half = [str(k) for k in range(1, num_layers // 2 + 1)]
    return ["--max_skip_prob", "0.8", "--early_exit_scale", "1.0", "--early_exit_curriculum", "rotational",
            "--early_exit_tokens", "0.125", "--early_exit_weighting", "uniform", "--early_exit_distill", "0.9",
            *(["--early_exit_layers", *first_half] if first_half else [])]


LAYERSKIP_FLAGS = layerskip_flags(TrainConfig.num_layers)  # at the default depth
PLAIN_FLAGS = ["--max_skip_prob", "0", "--early_exit_scale", "0"]
# Drafts and early exits read the short head of the most frequent tokens (see docs/design.md).
SHORT_HEAD = "1024"
# --smoke: check the pipeline in seconds (compilation alone would take a minute), on a tiny
# model unless the command gives a size.
SMOKE_TRAIN_FLAGS = ["--no-compile", "--precision", "fp32"]
SMOKE_MODEL = {"d_model": 32, "num_layers": 3, "num_heads": 2, "d_ff": 64, "seq_len": 64, "vocab_size": 1000,
               "batch_size": 4}
SMOKE_MAX_STEPS, SMOKE_PROMPTS, SMOKE_NEW_TOKENS = 20, 2, 8
SMOKE_BENCH_FLAGS = ["--draft_layers", "1", "--ks", "2", "--dee_measures", "softmax", "--dee_thresholds", "0.5",
                     "--warmup", "0", "--eval_tokens", "1000", "--num_samples", "1"]


@dataclass
class DemoSettings:
    out: Path
    budget_minutes: float = 20.0
    data_dir: str | None = None
    device: str = "auto"
    seed: int = 0
    model_flags: list[str] = field(default_factory=list)  # passed to both trainings, e.g. ["--d_model", "64"]
    max_steps: int | None = None  # cap each training (tiny runs); the time budget still applies
    delta: float = 0.01
    num_prompts: int = 16
    new_tokens: int = 64
    bench_flags: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """The trained models' depth: --num_layers among model_flags, else `layerskip train`'s default."""
        flags = self.model_flags
        return int(flags[flags.index("--num_layers") + 1]) if "--num_layers" in flags else TrainConfig.num_layers

    def __post_init__(self) -> None:
        if not (self.budget_minutes > 0):
            raise ConfigError(f"--budget must be a positive number of minutes, got {self.budget_minutes}")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a directory for the demo's runs and report")


@dataclass
class Stage:
    name: str
    argv: list[str]  # after `layerskip`
    done_when: Path  # the file that exists once the stage has finished

    @property
    def command(self) -> str:
        import shlex

        return "layerskip " + " ".join(shlex.quote(a) for a in self.argv)


def plan_stages(s: DemoSettings) -> list[Stage]:
    out = s.out
    common = (["--data-dir", s.data_dir] if s.data_dir else []) + ["--device", s.device]
    train_minutes = f"{s.budget_minutes * TRAIN_SHARE:.3g}"
    steps = ["--max_steps", str(s.max_steps)] if s.max_steps else []

    def train(name: str, recipe: list[str]) -> Stage:
        argv = ["train", "--out", str(out / name), "--time_budget", train_minutes, "--seed", str(s.seed),
                *steps, *recipe, *s.model_flags, *common]
        return Stage(f"train-{name}", argv, out / name / "best" / "config.json")

    def calibrate(name: str, measure: str, output: Path) -> Stage:
        return Stage(name, ["calibrate", "--checkpoint", str(out / "layerskip"), "--output", str(output), "--delta",
                            str(s.delta), "--measure", measure, "--exit_vocab", SHORT_HEAD, *common], output)

    # the softmax policy is the report's featured DEE; CALM's learned classifier exits more tokens at the same
    # bound, and its generations drift further from AR's
    thresholds = out / "thresholds.json"
    learned = out / "thresholds-classifier.json"
    results = out / "results.json"
    report = out / "report"
    return [
        train("layerskip", layerskip_flags(s.num_layers)),
        train("plain", PLAIN_FLAGS),
        calibrate("calibrate", "softmax", thresholds),
        calibrate("calibrate-classifier", "classifier", learned),
        Stage("bench", ["bench", "--checkpoint", str(out / "layerskip"), "--baseline", str(out / "plain"),
                        "--thresholds", str(thresholds), str(learned), "--out", str(results),
                        "--num_prompts", str(s.num_prompts),
                        "--new_tokens", str(s.new_tokens), "--seed", str(s.seed), "--draft_vocab", SHORT_HEAD,
                        "--exit_vocab", SHORT_HEAD, *s.bench_flags, *common], results),
        Stage("report", ["report", str(results), "--out", str(report)], report / "index.html"),
    ]


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"stages": {}}  # a damaged state file only costs re-running stages
    return state if isinstance(state.get("stages"), dict) else {"stages": {}}


def save_state(out: Path, state: dict[str, Any]) -> None:
    write_json(out / STATE_FILE, state)


def stage_finished(stage: Stage, state: dict[str, Any]) -> bool:
    record = state["stages"].get(stage.name, {})
    return record.get("status") == "done" and record.get("command") == stage.command and stage.done_when.exists()


def with_resume(stage: Stage) -> Stage:
    """A training stage whose run directory already holds a checkpoint continues it."""
    if stage.name.startswith("train-"):
        run_dir = Path(stage.argv[stage.argv.index("--out") + 1])
        if (run_dir / "last" / "config.json").is_file():
            return Stage(stage.name, [*stage.argv, "--resume"], stage.done_when)
        if run_dir.exists():
            return Stage(stage.name, [*stage.argv, "--overwrite"], stage.done_when)  # a run that never saved
    return stage


def run_demo(settings: DemoSettings) -> Path:
    """Run every unfinished stage; return the report's index.html."""
    from layerskip.cli import main as cli_main

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    state["settings"] = {"budget_minutes": settings.budget_minutes, "seed": settings.seed}
    stages = plan_stages(settings)
    start = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        if stage_finished(stage, state):
            log(f"[{number}/{len(stages)}] {stage.name}: done before, skipped")
            continue
        to_run = with_resume(stage)
        log(f"[{number}/{len(stages)}] {stage.name}\n$ {to_run.command}")
        stage_start = time.perf_counter()
        status = cli_main(to_run.argv)
        if status != 0:
            raise LayerskipError(
                f"stage {stage.name} failed (exit status {status}); fix the problem above and re-run the demo, "
                "which resumes from this stage"
            )
        state["stages"][stage.name] = {"status": "done", "command": stage.command,
                                       "seconds": round(time.perf_counter() - stage_start, 1)}
        save_state(out, state)
    state["total_seconds_this_run"] = round(time.perf_counter() - start, 1)
    save_state(out, state)
    return stages[-1].done_when

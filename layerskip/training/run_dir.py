"""The run directory: what --out may hold, reading a run back to resume it, and its metrics log.

    RUN/metrics.jsonl   one JSON record per line: {"type": "train"|"val"|"end", "step": ...}
    RUN/best/           checkpoint with the lowest final-layer validation loss
    RUN/last/           latest checkpoint, with trainer_state.pt for resuming
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerskip.errors import ConfigError
from layerskip.training.config import RESUME_OVERRIDABLE, TrainConfig, saved_train_config

METRICS_FILE = "metrics.jsonl"


def run_dir_state(out_dir: Path) -> str:
    """'empty' (absent or empty), 'run' (holds a run) or 'other' (files that are not a run)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a directory for the run")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "empty"
    markers = (METRICS_FILE, "last", "best", ".last.old")
    return "run" if any((out_dir / m).exists() for m in markers) else "other"


def prepare_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check what --out holds against --resume/--overwrite; True when resuming."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    state = run_dir_state(out_dir)
    if resume:
        _tidy_for_resume(out_dir)
        return True
    if state == "run" and not overwrite:
        raise ConfigError(f"{out_dir} already holds a training run; pass --resume to continue it "
                          "or --overwrite to replace it")
    if state == "other" and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose another --out or pass --overwrite to replace it")
    if state != "empty":
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return False


def _tidy_for_resume(out_dir: Path) -> None:
    """Undo what a kill mid-write left behind, and refuse a directory with nothing to resume."""
    from layerskip.checkpoint import _recover_interrupted_swap

    for name in ("last", "best"):
        _recover_interrupted_swap(out_dir / name)
    for stale in out_dir.glob(".*.tmp-*"):  # a checkpoint write cut short by a kill
        shutil.rmtree(stale, ignore_errors=True)
    if not (out_dir / "last" / "trainer_state.pt").is_file():
        raise ConfigError(f"--resume: {out_dir} holds no resumable run (no last/trainer_state.pt); "
                          "drop --resume to start a new run")


def resume_config(out_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The saved config of the run in out_dir, with settings that only change when to stop."""
    from layerskip.checkpoint import read_config, resolve_checkpoint_dir

    saved = saved_train_config(read_config(resolve_checkpoint_dir(Path(out_dir) / "last"))["train"])
    changes = {k: v for k, v in (overrides or {}).items() if getattr(saved, k, object()) != v}
    refused = sorted(set(changes) - RESUME_OVERRIDABLE)
    if refused:
        raise ConfigError(
            f"--resume continues the saved run, whose {', '.join(f'{k}={getattr(saved, k)!r}' for k in refused)} "
            f"differ from what was given; only {sorted(RESUME_OVERRIDABLE)} may change. Start a new run instead"
        )
    return saved.replace(**changes)


@dataclass
class ResumePoint:
    """What a run continues from: last/'s trainer state, its checkpoint and the config it was trained with."""

    state: dict[str, Any] | None
    checkpoint: Any  # layerskip.checkpoint.Checkpoint
    saved_cfg: TrainConfig


def load_resume_point(out_dir: Path, cfg: TrainConfig) -> ResumePoint:
    """Read RUN/last, refusing a cfg that differs from the saved one in more than RESUME_OVERRIDABLE."""
    from layerskip.checkpoint import load_checkpoint, load_trainer_state

    state = load_trainer_state(out_dir / "last")
    ckpt = load_checkpoint(out_dir / "last")
    saved = saved_train_config(ckpt.train_config)
    differ = [k for k in saved.to_dict() if k not in RESUME_OVERRIDABLE and getattr(saved, k) != getattr(cfg, k)]
    if differ:
        raise ConfigError(f"--resume: the saved run has {', '.join(f'{k}={getattr(saved, k)!r}' for k in differ)}; "
                          "resume with the saved settings (see resume_config) or start a new run")
    return ResumePoint(state, ckpt, saved)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint being resumed from (a killed run's tail)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsLog:
    """RUN/metrics.jsonl, appended to and flushed record by record; a no-op where not enabled (ranks > 0)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()

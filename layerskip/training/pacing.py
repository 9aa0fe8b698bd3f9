"""How many steps a run's schedule spans (the LR decay and curricula end there).

--epochs and --max_steps fix it at the start; under --time_budget it is as many steps as fit
in the time left, re-measured from the pace of the latest steps as the run goes on.
"""

from __future__ import annotations

import time
from typing import Any

from layerskip.training.config import TrainConfig

# Re-measured this often: step times drift over a run, and a length fixed from the first
# steps' pace ended the budget before the cosine decay had.
PACE_STEPS = 50
FIRST_PACE_STEPS = 10  # the first measurement, which fixes the schedule, comes sooner
PACE_AFTER = 3  # steps into a run (or resume) before timing starts: past compilation
NO_LIMIT = 10**9


def step_limit(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The most steps --epochs / --max_steps allow (a time budget alone allows any number)."""
    limits = [n for n in (cfg.epochs and cfg.epochs * steps_per_epoch, cfg.max_steps) if n]
    return min(limits) if limits else NO_LIMIT


def planned_steps(cfg: TrainConfig, steps_per_epoch: int, saved_cfg: TrainConfig | None,
                  state: dict[str, Any] | None) -> tuple[int, bool]:
    """(total steps, whether that is final) at the start of a run; not final under a time
    budget until step times are measured."""
    limits_of = lambda c: (c.epochs, c.max_steps, c.time_budget)  # noqa: E731
    if state and limits_of(saved_cfg) == limits_of(cfg):
        # the same schedule as if never stopped (unless it was never fixed: stopped too early)
        return int(state["total_steps"]), bool(state.get("total_fixed", True))
    if cfg.time_budget is None:
        return (steps_per_epoch if not (cfg.epochs or cfg.max_steps) else step_limit(cfg, steps_per_epoch)), True
    return step_limit(cfg, steps_per_epoch), False


def steps_within_budget(cfg: TrainConfig, *, step: int, remaining: float, step_seconds: float,
                        val_seconds: float | None, valid_tokens: int, steps_per_epoch: int) -> tuple[int, float]:
    """(total steps, seconds a validation costs): as many steps as fit in `remaining` seconds,
    leaving room for the validations they bring."""
    val_tokens = min(cfg.val_tokens or valid_tokens, valid_tokens)
    # before the first validation is timed: no backward pass, but all L exits through the head,
    # so a validation batch costs about one step
    val_cost = val_seconds or step_seconds * val_tokens / (cfg.batch_size * cfg.seq_len)
    steps_left = remaining / step_seconds
    validations = 1 + steps_left / steps_per_epoch + (steps_left / cfg.val_every if cfg.val_every else 0)
    fit = int((remaining - validations * val_cost) / step_seconds)
    total = max(step + 1, min(step_limit(cfg, steps_per_epoch), step + fit))
    return total, val_cost


def schedule_end_reason(cfg: TrainConfig, step: int, steps_per_epoch: int) -> str:
    """Why a run whose schedule has ended stops: the limit that set its length."""
    if cfg.max_steps and step >= cfg.max_steps:
        return "max_steps"
    if cfg.epochs and step >= cfg.epochs * steps_per_epoch:
        return "epochs"
    return "time_budget" if cfg.time_budget else "epochs"


class Pace:
    """Seconds per step over windows of PACE_STEPS steps (FIRST_PACE_STEPS before the schedule
    is fixed); a validation starts a new window, since it is not a step."""

    def __init__(self, first_step: int) -> None:
        self.start_step = first_step + PACE_AFTER
        self.window: tuple[int, float] | None = None  # (step, time) the current window began at

    def before_step(self, step: int) -> None:
        if step == self.start_step:
            self.window = (step, time.perf_counter())

    def after_step(self, step: int, *, fixed: bool) -> float | None:
        """Seconds per step when `step` completes a window (which starts the next one), else None."""
        if not self.window or step - self.window[0] < (PACE_STEPS if fixed else FIRST_PACE_STEPS):
            return None
        now = time.perf_counter()
        seconds = (now - self.window[1]) / (step - self.window[0])
        self.window = (step, now)
        return seconds

    def restart(self, step: int) -> None:
        """Begin a new window at `step` (if timing has started)."""
        if self.window:
            self.window = (step, time.perf_counter())

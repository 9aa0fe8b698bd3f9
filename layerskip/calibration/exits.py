"""One exit policy over exit scores: each token's exit layer, the disagreements, the head evaluations.

A policy is a list of per-layer thresholds (layers 1..L-1, inf: never exit there); a token
exits at the first layer whose confidence reaches its threshold, else after the last block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from layerskip.calibration.scores import ExitScores


def policy_exit_layers(confidence: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Exit layer (1..L) of every token under per-layer thresholds (inf: never exit there)."""
    num_exits, n = confidence.shape
    exits = np.full(n, num_exits + 1, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for row, lam in enumerate(thresholds):
        if not math.isfinite(lam):
            continue
        hit = undecided & (confidence[row] >= lam)
        exits[hit] = row + 1
        undecided &= ~hit
    return exits


def head_evals(exits: np.ndarray, thresholds: Sequence[float], measure: str) -> np.ndarray:
    """LM-head evaluations DEE spends on each token exiting at `exits` (as DynamicEarlyExit counts them)."""
    num_layers = len(thresholds) + 1
    if measure in ("saturation", "classifier"):
        return np.ones_like(exits)  # only the exit's head (the classifier's short heads are counted apart)
    checked = np.array([layer for layer, lam in enumerate(thresholds, start=1) if math.isfinite(lam)])
    passed = (checked[None, :] <= exits[:, None]).sum(1) if checked.size else np.zeros_like(exits)
    return passed + (exits == num_layers)


def policy_disagreements(scores: ExitScores, thresholds: Sequence[float]) -> tuple[int, np.ndarray]:
    """(number of tokens whose exit's top-1 differs from the final top-1, exit layers)."""
    exits = policy_exit_layers(scores.confidence, thresholds)
    early = np.nonzero(exits < scores.num_layers)[0]
    wrong = int((~scores.agree[exits[early] - 1, early]).sum())
    return wrong, exits

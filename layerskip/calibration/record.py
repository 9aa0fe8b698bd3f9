"""The thresholds.json record a calibration writes: the policy, its guarantee in words, how it was found.

``layerskip.thresholds`` reads it back (and checks it against the model) without this package.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from layerskip.calibration.policy import Calibration
from layerskip.jsonfile import write_json
from layerskip.thresholds import FORMAT, VERSION

RISK_DEFINITION = (
    "per-token teacher-forced disagreement: the fraction of tokens whose DEE exit's top-1 "
    "differs from the full model's top-1, on real text with exact K/V for the context"
)
METHOD_DESCRIPTIONS = {
    "per-layer": "learn-then-test, fixed-sequence, binomial tail; per-layer thresholds from one "
    "parameter t (each layer exits where its learn-half isotonic disagreement at that confidence is <= t)",
    "global": "learn-then-test, fixed-sequence, binomial tail; one shared threshold on every checked layer",
}


def guarantee_text(cal: Calibration) -> str:
    return (
        f"With probability at least {1 - cal.epsilon:g} over the {cal.test_tokens} held-out test tokens, "
        f"the per-token teacher-forced disagreement between this DEE policy's exit top-1 and the full "
        f"model's top-1 is at most {cal.delta:g}, assuming those tokens and the tokens DEE is used on are "
        "independent draws from one distribution (running text is dependent, so the effective sample is "
        "smaller). It holds for greedy top-1 with exactly these thresholds, measure, exit_vocab, min_exit_layer "
        "and check_every" + (" and this exit classifier (fit on the learn half only)" if cal.classifier else "")
        + "; DEE's own generations (propagated K/V, its own prefix) are measured separately."
    )


def thresholds_record(cal: Calibration, *, data: dict[str, Any], model_info: dict[str, Any],
                      generated: dict[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """The JSON document written to thresholds.json (null threshold: never exit at that layer)."""
    record = {
        "format": FORMAT,
        "version": VERSION,
        "measure": cal.measure,
        "num_layers": cal.num_layers,
        "thresholds": [t if math.isfinite(t) else None for t in cal.thresholds],
        "thresholds_note": "entry i is layer i+1 (exit after i+1 blocks); null means never exit there; "
        "the last layer always exits",
        "exit_vocab": cal.exit_vocab,
        "exit_vocab_note": "early exits read the shared head's rows of this many most frequent training tokens "
        "(null: the full head)",
        "min_exit_layer": cal.min_exit_layer,
        "check_every": cal.check_every,
        "delta": cal.delta,
        "epsilon": cal.epsilon,
        "guarantee": guarantee_text(cal),
        "method": {
            "name": cal.method,
            "description": METHOD_DESCRIPTIONS[cal.method],
            **cal.extra,
            "family_size": cal.family_size,
            "members_tested": cal.tested,
            "chosen_index": cal.chosen_index,
            "p_value": cal.p_value,
            "learn_fraction_seed": cal.seed,
        },
        "risk": {
            "definition": RISK_DEFINITION,
            "test_disagreement": cal.test_risk,
            "test_disagreements": cal.test_disagreements,
            "test_tokens": cal.test_tokens,
            "mean_exit_layer_teacher_forced": cal.mean_exit_layer,
            "blocks_per_token_teacher_forced": cal.mean_exit_layer,
            "head_evals_per_token_teacher_forced": cal.head_evals_per_token,
            "exit_layer_counts_teacher_forced": cal.exit_layer_counts,
            "generated_text": generated or {},
        },
        "data": {**data, "learn_tokens": cal.learn_tokens, "test_tokens": cal.test_tokens},
        "model": model_info,
        "command": command,
    }
    if cal.classifier is not None:  # the classifier is part of the policy: it travels with the thresholds
        record["classifier"] = cal.classifier.to_record()
    return record


def write_json_atomic(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a thresholds record to `path` (strict JSON, atomically); errors name --output."""
    return write_json(path, record, flag="--output")

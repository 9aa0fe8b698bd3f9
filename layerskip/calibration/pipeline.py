"""The entry points the CLI and Python share: calibrate a checkpoint, evaluate a thresholds file.

Each loads what it needs (checkpoint, WikiText-2), scores every exit, and reports on stderr
when `progress` is on; results are returned (and the thresholds file written) for the caller.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerskip.calibration.classifier import DEFAULT_HIDDEN, FIT_TOKENS, check_classifier_settings
from layerskip.calibration.exits import head_evals, policy_disagreements
from layerskip.calibration.generated import generated_disagreement
from layerskip.calibration.policy import Calibration, calibrate_scores, check_method
from layerskip.calibration.record import thresholds_record, write_json_atomic
from layerskip.calibration.scores import ExitScores, exit_scores
from layerskip.calibration.selection import check_selection, weight_costs
from layerskip.checkpoint import Checkpoint, load_checkpoint
from layerskip.config import check_measure
from layerskip.console import log
from layerskip.data import load_corpus
from layerskip.decoding.dee import DynamicEarlyExit, check_policy
from layerskip.decoding.measures import CLASSIFIER_VOCAB
from layerskip.device import resolve_device
from layerskip.errors import ConfigError
from layerskip.jsonfile import sanitize
from layerskip.thresholds import (
    Thresholds,
    check_risk_settings,
    model_fingerprint,
    thresholds_for,
    thresholds_from_record,
)


def calibrate_checkpoint(
    checkpoint: Checkpoint | str | Path,
    *,
    output: str | Path | None = None,
    delta: float = 0.01,
    epsilon: float = 0.05,
    measure: str = "softmax",
    method: str = "auto",
    exit_vocab: int | None = None,
    min_exit_layer: int = 1,
    check_every: int = 1,
    data_dir: str | Path | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    gen_prompts: int = 8,
    gen_tokens: int = 32,
    seed: int = 0,
    classifier_vocab: int = CLASSIFIER_VOCAB,
    classifier_hidden: int = DEFAULT_HIDDEN,
    classifier_fit_tokens: int = FIT_TOKENS,
    select_layers: str = "cost",
    check_cost: float | None = None,
    device: str = "auto",
    command: str | None = None,
    progress: bool = True,
) -> Thresholds:
    """Calibrate DEE thresholds on the validation split (see the package docstring for the guarantee).

    checkpoint: a loaded Checkpoint (used where it is) or a checkpoint/run directory (loaded on
        `device`). output: where to write thresholds.json (None: write nothing). command: the
        command line recorded in the file. progress: log the run and the result on stderr.
        classifier_*: measure "classifier" only: the features' short head, the hidden units of its
        MLP (0: logistic regression), the learn-half tokens it is fit on at most.
        select_layers: "cost" checks only the layers whose checks save more than they cost on the learn
        half (``selection``), "all" every layer min_exit_layer and check_every allow. check_cost: the
        check's cost in blocks (measured, e.g. by ``layerskip.costs``), instead of its weights' estimate.
    Returns the policy, whose ``.record`` is the whole thresholds record and ``.strategy()`` the DEE.
    """
    check_risk_settings(delta, epsilon)
    check_method(method)
    _check_classifier_options(measure, classifier_vocab, classifier_hidden, classifier_fit_tokens)
    check_selection(select_layers, check_cost)
    check_counts(dict(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, gen_prompts=gen_prompts,
                      gen_tokens=gen_tokens))
    ckpt, device = _checkpoint_on(checkpoint, device)
    corpus = load_corpus(data_dir, tokenizer=ckpt.tokenizer)
    model = ckpt.model
    check_policy(min_exit_layer, check_every, exit_vocab, model.num_layers)
    valid = corpus.tokens["valid"]  # calibration never reads the test split
    if progress:
        head = "the full head" if exit_vocab is None else f"a {exit_vocab}-token short head"
        log(f"calibrate: {min(len(valid), max_tokens or len(valid)):,} validation tokens, {model.num_layers} layers, "
            f"measure {measure}, exits through {head}, delta {delta:g}, epsilon {epsilon:g}")
    scores = exit_scores(model, valid, measure, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                         progress=progress_bar if progress else None, exit_vocab=exit_vocab,
                         classifier_vocab=classifier_vocab)
    costs = None if select_layers == "all" else weight_costs(
        model, measure, exit_vocab, classifier_vocab if measure == "classifier" else None, classifier_hidden,
        check_cost)
    result = calibrate_scores(scores, delta=delta, epsilon=epsilon, method=method, min_exit_layer=min_exit_layer,
                              check_every=check_every, seed=seed, classifier_hidden=classifier_hidden,
                              classifier_fit_tokens=classifier_fit_tokens, costs=costs)
    scores.features = None  # the classifier's features are fit and scored: free them before generating
    dee = DynamicEarlyExit(result.thresholds, result.measure, exit_vocab=result.exit_vocab,
                           classifier=result.classifier)
    generated = _generated(model, dee, valid, gen_prompts, gen_tokens)
    data = {"split": "valid", "data_dir": str(corpus.data_dir), "tokens": scores.num_tokens,
            "windows": scores.num_windows, "seq_len": scores.seq_len, "max_tokens": max_tokens}
    model_info = {"fingerprint": model_fingerprint(model), "num_layers": model.num_layers,
                  "checkpoint": str(ckpt.path), "device": str(device)}
    record = thresholds_record(result, data=data, model_info=model_info, generated=generated, command=command)
    path = None if output is None else write_json_atomic(output, record)
    if progress:
        log_calibration(result, record, generated)
    return thresholds_from_record(sanitize(record), model.num_layers, path=path)  # sanitized: as the file reads


def evaluate_thresholds(
    checkpoint: Checkpoint | str | Path,
    thresholds: Thresholds | str | Path,
    *,
    split: str = "valid",
    data_dir: str | Path | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    gen_prompts: int = 8,
    gen_tokens: int = 32,
    device: str = "auto",
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Teacher-forced disagreement, exit layers and the generated-text check of a policy on a split.

    thresholds: a thresholds file or a loaded Thresholds; either is checked against the model.
    """
    if split not in ("valid", "test"):
        raise ConfigError(f"split must be valid or test, got {split!r}")
    check_counts(dict(max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, gen_prompts=gen_prompts,
                      gen_tokens=gen_tokens))
    ckpt, _ = _checkpoint_on(checkpoint, device)
    corpus = load_corpus(data_dir, tokenizer=ckpt.tokenizer)
    model = ckpt.model
    policy = thresholds_for(model, thresholds)
    tokens = corpus.tokens[split]
    scores = exit_scores(model, tokens, policy.measure, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                         progress=progress_bar if progress else None, exit_vocab=policy.exit_vocab,
                         classifier=policy.classifier)
    return {
        "thresholds_file": None if policy.path is None else str(policy.path),
        "split": split, "tokens": scores.num_tokens, "measure": policy.measure, "exit_vocab": policy.exit_vocab,
        "delta": policy.delta, "epsilon": policy.epsilon,
        **_teacher_forced(scores, policy),
        "generated_text": _generated(model, policy.strategy(), tokens, gen_prompts, gen_tokens),
        "command": command,
    }


def check_counts(counts: dict[str, int | None], *, prefix: str = "") -> None:
    """Sizes (max_tokens, seq_len, batch_size) must be >= 1 or None, gen_prompts / gen_tokens >= 0."""
    for name, value in counts.items():
        least = 0 if name.startswith("gen_") else 1
        if value is not None and value < least:
            raise ConfigError(f"{prefix}{name} must be >= {least}, got {value}")


def _check_classifier_options(measure: str, vocab: int, hidden: int, fit_tokens: int) -> None:
    """The classifier settings (checked for every measure, so a typo never waits for the scoring pass)."""
    check_measure(measure)
    check_classifier_settings(hidden, fit_tokens)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
        raise ConfigError(f"classifier_vocab must be an integer >= 2 (tokens in the classifier's short head), "
                          f"got {vocab!r}")


def log_calibration(result: Calibration, record: dict[str, Any], generated: dict[str, Any]) -> None:
    """The outcome in a few lines: thresholds, held-out risk and cost, the generated-text check."""
    shown = ", ".join("-" if t is None else f"{t:.4g}" for t in record["thresholds"])
    log(f"thresholds (layers 1..{result.num_layers - 1}; - never exits): {shown} [{result.method}]")
    selection = result.extra.get("layer_selection", {})
    if selection.get("selection") == "cost":
        spent = selection["learn_half_cost_per_token"]
        log(f"checked layers chosen by cost: {', '.join(map(str, selection['selected_layers'])) or 'none'} of "
            f"{', '.join(map(str, selection['allowed_layers']))} (learn-half cost per token {spent['allowed']:.2f} "
            f"-> {spent['selected']:.2f} blocks)")
    log(f"held-out teacher-forced disagreement {result.test_risk:.4%} on {result.test_tokens:,} tokens "
        f"(bound {result.delta:g} at 1-epsilon {1 - result.epsilon:g}); mean exit layer {result.mean_exit_layer:.2f}, "
        f"LM-head evaluations per token {result.head_evals_per_token:.2f}")
    counts = np.cumsum(result.exit_layer_counts[:-1]) / max(result.test_tokens, 1)
    log("held-out tokens exiting by layer 1.." + f"{result.num_layers - 1}: " + ", ".join(f"{c:.1%}" for c in counts))
    if generated.get("new_tokens"):
        log(f"on DEE's own generations: disagreement {generated['disagreement']:.2%}, mean exit layer "
            f"{generated['mean_exit_layer']:.2f} ({generated['new_tokens']} tokens; not covered by the guarantee)")
    if result.chosen_index < 0:
        log("no exit threshold passed the test: every threshold is null, so DEE equals the full model")


def progress_bar(done: int, total: int) -> None:
    """One stderr line for the scoring pass, redrawn every 10 batches."""
    if done == total or done % 10 == 0:
        end = "\n" if done == total else ""
        print(f"\r  exit scores: {done}/{total} batches", end=end, file=sys.stderr, flush=True)


def _checkpoint_on(checkpoint: Checkpoint | str | Path, device: str) -> tuple[Checkpoint, torch.device]:
    """The checkpoint and the device it is on (a path is loaded on `device`)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint, checkpoint.model.embed_tokens.weight.device
    resolved = resolve_device(device)
    return load_checkpoint(checkpoint, device=resolved), resolved


def _teacher_forced(scores: ExitScores, policy: Thresholds) -> dict[str, Any]:
    wrong, exits = policy_disagreements(scores, policy.thresholds)
    return {
        "teacher_forced_disagreement": wrong / scores.num_tokens, "disagreements": wrong,
        "mean_exit_layer": float(exits.mean()),
        "head_evals_per_token": float(head_evals(exits, policy.thresholds, policy.measure).mean()),
        "exit_layer_counts": [int((exits == layer).sum()) for layer in range(1, scores.num_layers + 1)],
    }


def _generated(model: torch.nn.Module, dee: DynamicEarlyExit, tokens: np.ndarray, prompts: int,
               new_tokens: int) -> dict[str, Any]:
    if not (prompts and new_tokens):
        return {}
    return generated_disagreement(model, dee, tokens, num_prompts=prompts, new_tokens=new_tokens)

"""Exit policies' one-parameter families, and the Learn-then-Test choice among them.

A policy is a list of per-layer thresholds (layers 1..L-1, inf: never exit there); its
teacher-forced disagreement and exit layers are counts over ExitScores (exits.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerskip.calibration.classifier import DEFAULT_HIDDEN, FIT_TOKENS, classifier_scores, fit_classifier
from layerskip.calibration.exits import head_evals, policy_disagreements
from layerskip.calibration.scores import ExitScores
from layerskip.calibration.selection import CheckCosts, select_layers
from layerskip.calibration.stats import fixed_sequence_test, local_error_curve
from layerskip.decoding.dee import check_policy
from layerskip.decoding.measures import ExitClassifier
from layerskip.errors import ConfigError
from layerskip.thresholds import check_risk_settings, checked_mask

METHODS = ("auto", "per-layer", "global")
AUTO_RISK_LEVELS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


# ----------------------------------------------------------------------------- families


def per_layer_family(learn: ExitScores, checked: list[bool], grid: np.ndarray) -> list[list[float]]:
    """lambda(t) for t in the (ascending) grid, learnt on the learn half.

    lambda_l(t) is the lowest confidence at which exit l's estimated disagreement with the
    final top-1, *at that confidence* (an isotonic fit over the learn tokens sorted by c_l),
    is still <= t: every layer exits the tokens whose own risk is below the same level t,
    which spends a risk budget better than one shared threshold when layers' confidences
    mean different things. Each lambda_l(t) is non-increasing in t.
    """
    num_exits = learn.num_layers - 1
    members = [[math.inf] * num_exits for _ in grid]
    for row in range(num_exits):
        if not checked[row] or learn.num_tokens == 0:
            continue
        lows, rate = local_error_curve(learn.confidence[row], learn.agree[row])
        for m, t in enumerate(grid):
            ok = np.nonzero(rate <= t)[0]  # rate is non-decreasing, so this is a prefix
            if ok.size:
                members[m][row] = float(lows[ok[-1]])
    return members


def global_family(learn: ExitScores, checked: list[bool]) -> list[list[float]]:
    """One shared threshold on every checked layer, from 1 down to 0."""
    pooled = learn.confidence[[r for r, c in enumerate(checked) if c]].ravel()
    values = np.linspace(0.0, 1.0, 201)
    if pooled.size:
        values = np.concatenate([values, np.quantile(pooled, np.linspace(0.0, 1.0, 801))])
    values = np.unique(values.astype(np.float64))[::-1]
    return [[float(v) if c else math.inf for c in checked] for v in values]


def per_layer_grid() -> np.ndarray:
    """t from 0 up to 1 (the same for every delta, so thresholds are monotone in delta)."""
    return np.concatenate([[0.0], np.geomspace(1e-5, 1.0, 400)])


def learn_half_exit_layers(learn: ExitScores, family: list[list[float]]) -> dict[str, float]:
    """For each risk level r in AUTO_RISK_LEVELS: the learn-half mean exit layer of the last
    member, in order, whose learn-half disagreement is <= r (the family's speed at that risk)."""
    curve: list[tuple[float, float]] = []
    for member in family:
        wrong, exits = policy_disagreements(learn, member)
        curve.append((wrong / learn.num_tokens, float(exits.mean())))
        if curve[-1][0] > max(AUTO_RISK_LEVELS):
            break
    result = {}
    for level in AUTO_RISK_LEVELS:
        best = float(learn.num_layers)
        for risk, mean_exit in curve:
            if risk > level:
                break
            best = mean_exit
        result[f"{level:g}"] = best
    return result


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    thresholds: list[float]  # layers 1..L-1, inf: never exit there
    measure: str
    delta: float
    epsilon: float
    method: str
    num_layers: int
    min_exit_layer: int
    check_every: int
    learn_tokens: int
    test_tokens: int
    test_disagreements: int
    p_value: float | None
    family_size: int
    chosen_index: int
    tested: int
    mean_exit_layer: float  # teacher-forced, on the test half
    head_evals_per_token: float = 0.0  # teacher-forced, on the test half
    seed: int = 0
    exit_vocab: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    classifier: ExitClassifier | None = None  # measure "classifier": fit on the learn half
    exit_layer_counts: list[int] = field(default_factory=list)  # test-half tokens exiting after block 1..L

    @property
    def test_risk(self) -> float:
        return self.test_disagreements / self.test_tokens if self.test_tokens else 0.0


def check_method(method: str) -> str:
    """The method itself, or a ConfigError naming the valid ones."""
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def split_scores(scores: ExitScores, learn_fraction: float, seed: int) -> tuple[ExitScores, ExitScores]:
    """Disjoint learn / test halves, by whole windows in a seeded random order."""
    ids = np.unique(scores.window)
    rng = np.random.default_rng(seed)
    learn_ids = rng.permutation(ids)[: int(round(learn_fraction * len(ids)))]
    in_learn = np.isin(scores.window, learn_ids)
    return scores.subset(in_learn), scores.subset(~in_learn)


def calibrate_scores(
    scores: ExitScores,
    *,
    delta: float = 0.01,
    epsilon: float = 0.05,
    method: str = "auto",
    min_exit_layer: int = 1,
    check_every: int = 1,
    learn_fraction: float = 0.5,
    seed: int = 0,
    classifier_hidden: int = DEFAULT_HIDDEN,
    classifier_fit_tokens: int = FIT_TOKENS,
    costs: CheckCosts | None = None,
) -> Calibration:
    """Learn-then-Test on precomputed exit scores (see the package docstring).

    Measure "classifier": scores with features get a classifier fit on the learn half only
    (``classifier_hidden`` units, 0: logistic regression), which then scores both halves;
    scores a given classifier already scored are used as they are.
    costs: choose the checked layers by their cost on the learn half (``selection.select_layers``);
    None: check every layer min_exit_layer and check_every allow.
    """
    check_risk_settings(delta, epsilon)
    requested = check_method(method)
    check_policy(min_exit_layer, check_every, scores.exit_vocab)
    if not 0 < learn_fraction < 1:
        raise ConfigError(f"learn_fraction must be in (0, 1), got {learn_fraction!r}")
    learn, test = split_scores(scores, learn_fraction, seed)
    if test.num_tokens == 0 or learn.num_tokens == 0:
        raise ConfigError(
            f"too little calibration text: {scores.num_tokens} tokens in {scores.num_windows} "
            "window(s) cannot be split into learn and test halves; use more tokens or a shorter --seq_len"
        )
    checked = checked_mask(scores.num_layers, min_exit_layer, check_every)
    if scores.measure == "classifier":
        learn, test = learned_confidences(learn, test, checked, hidden=classifier_hidden, seed=seed,
                                          fit_tokens=classifier_fit_tokens)
    families = {"per-layer": per_layer_family(learn, checked, per_layer_grid()),
                "global": global_family(learn, checked)}
    learn_choice = {}
    if method == "auto":
        method, learn_choice = auto_method(learn, families)
    family_of = family_builder(method, learn, families[method])
    selection: dict[str, Any] = {"selection": "all"}
    if costs is not None:
        checked, selection = select_layers(learn, checked, family_of, delta, costs)
    family = family_of(checked)
    result = fixed_sequence_test(lambda i: policy_disagreements(test, family[i])[0],
                                 len(family), test.num_tokens, delta, epsilon)
    thresholds = family[result.chosen] if result.chosen >= 0 else [math.inf] * (scores.num_layers - 1)
    wrong, exits = policy_disagreements(test, thresholds)
    chosen = result.tested[result.chosen] if result.chosen >= 0 else None
    return Calibration(
        thresholds=thresholds, measure=scores.measure, delta=delta, epsilon=epsilon, method=method,
        num_layers=scores.num_layers, min_exit_layer=min_exit_layer, check_every=check_every,
        learn_tokens=learn.num_tokens, test_tokens=test.num_tokens, test_disagreements=wrong,
        p_value=None if chosen is None else chosen["p_value"], family_size=len(family),
        chosen_index=result.chosen, tested=len(result.tested), mean_exit_layer=float(exits.mean()), seed=seed,
        head_evals_per_token=float(head_evals(exits, thresholds, scores.measure).mean()),
        exit_vocab=scores.exit_vocab,
        extra={"requested_method": requested, "auto_learn_half_mean_exit_layer_by_risk": learn_choice,
               "layer_selection": selection},
        classifier=test.classifier,
        exit_layer_counts=np.bincount(exits, minlength=scores.num_layers + 1)[1:].tolist(),
    )


def family_builder(method: str, learn: ExitScores,
                   full: list[list[float]]) -> Callable[[list[bool]], list[list[float]]]:
    """checked layers -> the method's family on them. A per-layer family masks the one built on every
    allowed layer (each layer's thresholds are its own); a global one pools the checked layers anew."""
    if method == "global":
        return lambda checked: global_family(learn, checked)

    def masked(checked: list[bool]) -> list[list[float]]:
        return [[lam if c else math.inf for lam, c in zip(member, checked)] for member in full]

    return masked


def learned_confidences(learn: ExitScores, test: ExitScores, checked: list[bool], *, hidden: int, seed: int,
                        fit_tokens: int) -> tuple[ExitScores, ExitScores]:
    """Both halves scored by a classifier fit on the learn half alone (the test half only gets scored).

    Scores that a given classifier already scored (no features) pass through unchanged.
    """
    if learn.features is None:
        if learn.classifier is None:
            raise ConfigError("classifier exit scores hold neither features nor a classifier's scores")
        return learn, test
    classifier = fit_classifier(learn, checked, hidden=hidden, seed=seed, fit_tokens=fit_tokens)
    return tuple(dataclasses.replace(half, confidence=classifier_scores(classifier, half.features), features=None,
                                     classifier=classifier) for half in (learn, test))


def auto_method(learn: ExitScores, families: dict[str, list[list[float]]]) -> tuple[str, dict[str, dict[str, float]]]:
    """The family with the lower learn-half mean exit layer averaged over AUTO_RISK_LEVELS, and those means.

    Decided on the learn half only (so the test half's guarantee is untouched) and
    independently of delta (so thresholds stay monotone in delta); ties go to per-layer.
    """
    by_risk = {name: learn_half_exit_layers(learn, family) for name, family in families.items()}
    best = min(families, key=lambda name: (np.mean(list(by_risk[name].values())), name != "per-layer"))
    return best, by_risk

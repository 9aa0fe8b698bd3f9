"""Calibrate dynamic-early-exit thresholds with a finite-sample risk guarantee -> thresholds.json.

In the spirit of CALM (Schuster et al., 2022), with Learn-then-Test (Angelopoulos et al.,
2021) and fixed-sequence testing.

**Risk.** The risk of thresholds lambda = (lambda_1 .. lambda_{L-1}) is the per-token
*teacher-forced* disagreement of the whole exit policy with the full model:

    R(lambda) = P[ top-1 of the exit DEE picks for a token != top-1 of the last layer ]

where the token's context is real text and every earlier position has the full model's
K/V. One forward pass with all exits over validation windows gives, for every token and
every layer l, the confidence c_l and whether exit l's top-1 equals the final top-1, so the
policy's disagreement for any lambda is a cheap count. DEE's own generations differ from
this (their prefix is DEE's output and the skipped layers hold propagated K/V), so the
disagreement on generated text is also *measured* and written to the file; it is a
measurement, not covered by the guarantee.

**Global risk, per-layer thresholds.** The risk is controlled for the whole exit policy,
never layer by layer, so delta is not split across layers. The calibration windows are
split at random (seeded) into a *learn* half and a *test* half. From the learn half only, a
one-parameter family of whole policies lambda(t) is built, ordered from the most
conservative member to the least:

- ``per-layer``: lambda_l(t) is the lowest confidence at which exit l's disagreement
  *at that confidence* (an isotonic fit of disagreement against falling c_l on the learn
  half) is still <= t; t runs over 0, then 400 geometric steps from 1e-5 to 1. Layers whose
  confidence means less get higher thresholds.
- ``global``: one shared threshold on every checked layer, descending over a grid (0..1 in
  steps of 0.005 plus quantiles of the learn half's confidences).
- ``auto`` (default): whichever of the two has the lower learn-half mean exit layer,
  averaged over fixed risk levels 0.5%..20%. The choice uses the learn half only and does
  not depend on delta.

Every lambda_l(t) is non-increasing along the family, and the family does not depend on
delta.

**Learn-then-Test with fixed-sequence testing.** On the other, *test* half (disjoint
windows; n tokens), for each family member in order, count its disagreements k and compute
the binomial-tail p-value of the null hypothesis "R > delta":

    p = P[ Binomial(n, delta) <= k ]

Reject (declare the member valid) when p <= epsilon and move on to the next, less
conservative member; stop at the first member that is not rejected. Testing the nulls in an
order fixed before looking at the test half controls the family-wise error rate at epsilon
without any correction, so the chosen member, the last one rejected, satisfies:

    **Guarantee.** If the test-half tokens and the tokens DEE is used on are independent
    draws from the same distribution, then with probability at least 1 - epsilon over the
    test half, R(lambda_hat) <= delta.

When no member is rejected, every threshold is infinite (``null`` in the file): DEE is the
full model and R = 0. Caveats (also in the file): tokens of running text are not
independent, so the effective sample size is smaller than n; the risk is about the greedy
top-1 under teacher forcing; the guarantee holds for the exact policy that was calibrated
(measure, min_exit_layer, check_every, thresholds), so changing any of them voids it.
Thresholds are monotone in delta: a smaller delta gives larger p-values, an earlier stop
and so thresholds that are the same or higher on every layer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerskip.errors import ConfigError
from layerskip.config import check_measure
from layerskip.generate.dee import DynamicEarlyExit, logit_confidence, saturation_confidence
from layerskip.jsonfile import write_json
from layerskip.model import decoding
from layerskip.thresholds import (
    FORMAT,
    VERSION,
    Thresholds,
    check_risk_settings,
    checked_mask,
    load_thresholds,
    model_fingerprint,
)

METHODS = ("auto", "per-layer", "global")
RISK_DEFINITION = (
    "per-token teacher-forced disagreement: the fraction of tokens whose DEE exit's top-1 "
    "differs from the full model's top-1, on real text with exact K/V for the context"
)


# ----------------------------------------------------------------------------- scores


@dataclass
class ExitScores:
    """Every exit's confidence and agreement with the final layer, for N teacher-forced tokens."""

    confidence: np.ndarray  # (L-1, N) float32: confidence after l blocks, row l-1
    agree: np.ndarray  # (L-1, N) bool: exit l's top-1 == the last layer's top-1
    window: np.ndarray  # (N,) int: the window each token came from (splits keep windows whole)
    num_layers: int
    measure: str
    seq_len: int = 0
    exit_vocab: int | None = None  # early exits through the short head of this many tokens

    @property
    def num_tokens(self) -> int:
        return int(self.agree.shape[1])

    @property
    def num_windows(self) -> int:
        return int(np.unique(self.window).size)

    def subset(self, mask: np.ndarray) -> ExitScores:
        return ExitScores(self.confidence[:, mask], self.agree[:, mask], self.window[mask], self.num_layers,
                          self.measure, self.seq_len, self.exit_vocab)


def _windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> list[np.ndarray]:
    """Non-overlapping full windows of seq_len tokens, in batches (a short tail is dropped)."""
    n = len(tokens) // seq_len
    starts = np.arange(n) * seq_len
    return [np.stack([tokens[s : s + seq_len] for s in starts[i : i + batch_size]]).astype(np.int64)
            for i in range(0, n, batch_size)]


@decoding()
def exit_scores(
    model: torch.nn.Module,
    tokens: np.ndarray,
    measure: str,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    exit_vocab: int | None = None,
) -> ExitScores:
    """One forward pass with all exits over windows of `tokens` (validation text).

    For every position (every window position is a prediction), every layer l < L: its
    confidence under `measure` and whether its top-1 equals the final layer's top-1. With
    `exit_vocab`, early exits read the short head as DEE does (confidence over those tokens,
    top-1 among them).
    """
    check_measure(measure)
    strategy = DynamicEarlyExit(0.0, measure, exit_vocab=exit_vocab)  # validates exit_vocab
    num_layers = model.num_layers
    if num_layers == 1:
        raise ConfigError("a 1-layer model has no early exits to calibrate")
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < seq_len:
        seq_len = len(tokens)
    if seq_len < 1:
        raise ConfigError("no calibration tokens: the held-out text is empty")
    device = model.embed_tokens.weight.device
    confs, agrees, windows = [], [], []
    batches = _windows(np.asarray(tokens), seq_len, batch_size)
    window_id = 0
    for b, batch in enumerate(batches):
        x = torch.from_numpy(batch).to(device)  # (B, T)
        out = model(x, exits=range(1, num_layers), compute_logits=False)
        final = model.unembed(out.hidden).argmax(-1)  # (B, T)
        prev = model.embed(x)
        conf_rows, agree_rows = [], []
        for layer in range(1, num_layers):
            h = out.exit_hidden[layer]
            logits, ids = strategy.exit_head(model, h, {"full": 0, "short": 0})  # (B, T, V or N)
            top1 = logits.argmax(-1) if ids is None else ids[logits.argmax(-1)]
            agree_rows.append((top1 == final).flatten().cpu())
            conf = saturation_confidence(h, prev) if measure == "saturation" else logit_confidence(logits, measure)
            conf_rows.append(conf.flatten().float().cpu())
            prev = h
        confs.append(torch.stack(conf_rows).numpy())
        agrees.append(torch.stack(agree_rows).numpy())
        windows.append(np.repeat(np.arange(window_id, window_id + x.shape[0]), seq_len))
        window_id += x.shape[0]
        if progress is not None:
            progress(b + 1, len(batches))
    return ExitScores(
        confidence=np.concatenate(confs, axis=1),
        agree=np.concatenate(agrees, axis=1),
        window=np.concatenate(windows),
        num_layers=num_layers,
        measure=measure,
        seq_len=seq_len,
        exit_vocab=exit_vocab,
    )


# ----------------------------------------------------------------------------- the policy


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
    if measure == "saturation":
        return np.ones_like(exits)  # only the exit's head
    checked = np.array([layer for layer, lam in enumerate(thresholds, start=1) if math.isfinite(lam)])
    passed = (checked[None, :] <= exits[:, None]).sum(1) if checked.size else np.zeros_like(exits)
    return passed + (exits == num_layers)


def policy_disagreements(scores: ExitScores, thresholds: Sequence[float]) -> tuple[int, np.ndarray]:
    """(number of tokens whose exit's top-1 differs from the final top-1, exit layers)."""
    exits = policy_exit_layers(scores.confidence, thresholds)
    early = np.nonzero(exits < scores.num_layers)[0]
    wrong = int((~scores.agree[exits[early] - 1, early]).sum())
    return wrong, exits


# ----------------------------------------------------------------------------- statistics


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], summed in log space (exact up to float rounding)."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
        + i * math.log(p) + (n - i) * math.log1p(-p)
    )
    return float(torch.logsumexp(log_pmf, 0).exp().clamp(max=1.0))


def binomial_pvalue(k: int, n: int, delta: float) -> float:
    """p-value of H0 "risk > delta" after seeing k losses in n i.i.d. tokens.

    Under H0 the count of losses is stochastically at least Binomial(n, delta), so
    P[K <= k] <= P[Binomial(n, delta) <= k]: rejecting when this is <= epsilon is a level-
    epsilon test.
    """
    return binomial_cdf(k, n, delta)


@dataclass
class FixedSequenceResult:
    chosen: int  # index of the last rejected member, -1 when none was rejected
    tested: list[dict[str, float]]  # {"index", "disagreements", "risk", "p_value"} in test order


def fixed_sequence_test(
    count_losses: Callable[[int], int], family_size: int, n: int, delta: float, epsilon: float
) -> FixedSequenceResult:
    """Test members 0, 1, ... in order; stop at the first whose null "risk > delta" stands."""
    tested: list[dict[str, float]] = []
    chosen = -1
    for index in range(family_size):
        k = count_losses(index)
        p = binomial_pvalue(k, n, delta)
        tested.append({"index": index, "disagreements": k, "risk": k / n, "p_value": p})
        if p > epsilon:
            break
        chosen = index
    return FixedSequenceResult(chosen=chosen, tested=tested)


# ----------------------------------------------------------------------------- families


def isotonic_increasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool-adjacent-violators)."""
    means: list[float] = []
    sizes: list[float] = []
    counts: list[int] = []
    for v, w in zip(values.tolist(), weights.tolist()):
        means.append(v), sizes.append(w), counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            w2 = sizes[-2] + sizes[-1]
            means[-2] = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / w2
            sizes[-2], counts[-2] = w2, counts[-2] + counts[-1]
            means.pop(), sizes.pop(), counts.pop()
    return np.repeat(np.array(means), counts)


def local_error_curve(conf: np.ndarray, agree: np.ndarray, max_bins: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(bin's lowest confidence, isotonic disagreement rate) for bins of tokens by falling confidence.

    The rate is the estimated disagreement of a token *at* that confidence (not of all the
    tokens above it), fitted to rise as confidence falls.
    """
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], (~agree[order]).astype(np.float64)
    edges = np.unique(np.linspace(0, len(conf), min(max_bins, len(conf)) + 1).astype(int))
    sums = np.add.reduceat(wrong, edges[:-1])
    sizes = np.diff(edges).astype(np.float64)
    return conf[edges[1:] - 1], isotonic_increasing(sums / sizes, sizes)


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

    @property
    def test_risk(self) -> float:
        return self.test_disagreements / self.test_tokens if self.test_tokens else 0.0


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
) -> Calibration:
    """Learn-then-Test on precomputed exit scores (see the module docstring)."""
    check_risk_settings(delta, epsilon)
    requested = method
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    DynamicEarlyExit(0.0, scores.measure, min_exit_layer, check_every)  # validates the settings
    if not 0 < learn_fraction < 1:
        raise ConfigError(f"learn_fraction must be in (0, 1), got {learn_fraction!r}")
    learn, test = split_scores(scores, learn_fraction, seed)
    if test.num_tokens == 0 or learn.num_tokens == 0:
        raise ConfigError(
            f"too little calibration text: {scores.num_tokens} tokens in {scores.num_windows} "
            "window(s) cannot be split into learn and test halves; use more tokens or a shorter --seq_len"
        )
    checked = checked_mask(scores.num_layers, min_exit_layer, check_every)
    families = {"per-layer": per_layer_family(learn, checked, per_layer_grid()),
                "global": global_family(learn, checked)}
    learn_choice = {}
    if method == "auto":
        # Decided on the learn half only (so the test half's guarantee is untouched) and
        # independently of delta (so thresholds stay monotone in delta): the family with
        # the lower mean exit layer averaged over fixed risk levels.
        learn_choice = {name: learn_half_exit_layers(learn, fam) for name, fam in families.items()}
        method = min(families, key=lambda name: (np.mean(list(learn_choice[name].values())), name != "per-layer"))
    family = families[method]
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
        extra={"requested_method": requested, "auto_learn_half_mean_exit_layer_by_risk": learn_choice},
    )


AUTO_RISK_LEVELS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


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


# ----------------------------------------------------------------------------- generated text


@decoding()
def generated_disagreement(
    model: torch.nn.Module,
    dee: DynamicEarlyExit,
    tokens: np.ndarray,
    *,
    num_prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 32,
) -> dict[str, Any]:
    """Measure DEE on its own generations (not covered by the guarantee).

    For prompts cut from `tokens` (evenly spaced), DEE generates greedily; the full model then
    reads prompt + DEE's text once (exact K/V) and we count the DEE tokens it would not have
    chosen at the same position ("disagreement"). Also reported: the fraction of DEE tokens
    before its first departure from the full model's own greedy continuation.
    """
    from layerskip.generate.base import SamplingConfig

    prompt_len = max(1, min(prompt_len, model.config.max_seq_len - new_tokens - 1))
    count = min(num_prompts, max(0, (len(tokens) - prompt_len) // prompt_len))
    if count == 0 or new_tokens < 1:
        return {"prompts": 0, "new_tokens": 0}
    full = DynamicEarlyExit(math.inf)
    device = model.embed_tokens.weight.device
    starts = np.linspace(0, len(tokens) - prompt_len, count).astype(int)
    wrong = total = prefix = 0
    exit_sum = 0
    for s in starts:
        prompt = [int(t) for t in tokens[s : s + prompt_len]]
        out = dee.generate(model, prompt, new_tokens, sampling=SamplingConfig())
        ref = full.generate(model, prompt, len(out.tokens)).tokens
        seq = torch.tensor([prompt + out.tokens], device=device)
        preds = model(seq).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        wrong += sum(p != t for p, t in zip(preds, out.tokens))
        total += len(out.tokens)
        prefix += next((i for i, (a, b) in enumerate(zip(out.tokens, ref)) if a != b), len(out.tokens))
        exit_sum += sum(out.stats["exit_layers"])
    return {
        "prompts": int(count),
        "prompt_tokens": prompt_len,
        "new_tokens": total,
        "disagreement": wrong / total,
        "matching_prefix_fraction": prefix / total,
        "mean_exit_layer": exit_sum / total,
        "note": "measured on DEE's own greedy generations from validation prompts; not covered by the guarantee",
    }


# ----------------------------------------------------------------------------- the file


def guarantee_text(cal: Calibration) -> str:
    return (
        f"With probability at least {1 - cal.epsilon:g} over the {cal.test_tokens} held-out test tokens, "
        f"the per-token teacher-forced disagreement between this DEE policy's exit top-1 and the full "
        f"model's top-1 is at most {cal.delta:g}, assuming those tokens and the tokens DEE is used on are "
        "independent draws from one distribution (running text is dependent, so the effective sample is "
        "smaller). It holds for greedy top-1 with exactly these thresholds, measure, exit_vocab, min_exit_layer "
        "and check_every; DEE's own generations (propagated K/V, its own prefix) are measured separately."
    )


def thresholds_record(cal: Calibration, *, data: dict[str, Any], model_info: dict[str, Any],
                      generated: dict[str, Any] | None = None, command: str | None = None) -> dict[str, Any]:
    """The JSON document written to thresholds.json (null threshold: never exit at that layer)."""
    method_names = {
        "per-layer": "learn-then-test, fixed-sequence, binomial tail; per-layer thresholds from one "
        "parameter t (each layer exits where its learn-half isotonic disagreement at that confidence is <= t)",
        "global": "learn-then-test, fixed-sequence, binomial tail; one shared threshold on every checked layer",
    }
    return {
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
            "description": method_names[cal.method],
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
            "generated_text": generated or {},
        },
        "data": {**data, "learn_tokens": cal.learn_tokens, "test_tokens": cal.test_tokens},
        "model": model_info,
        "command": command,
    }


def write_json_atomic(path: str | Path, record: dict[str, Any]) -> Path:
    return write_json(path, record, flag="--output")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

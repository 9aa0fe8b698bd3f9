"""The statistics of Learn-then-Test: binomial tail p-values, fixed-sequence testing, isotonic fits.

Pure numpy (no torch): these functions see counts and confidences, never a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_log_gamma = np.vectorize(math.lgamma, otypes=[np.float64])  # numpy has no lgamma


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], summed in log space (exact up to float rounding)."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    log_pmf = (
        math.lgamma(n + 1) - _log_gamma(i + 1) - _log_gamma(n - i + 1)
        + i * math.log(p) + (n - i) * math.log1p(-p)
    )
    top = log_pmf.max()
    return min(math.exp(top + math.log(np.exp(log_pmf - top).sum())), 1.0)


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

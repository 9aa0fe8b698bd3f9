"""layerskip.calibration.stats: binomial tail, fixed-sequence testing, isotonic fits (numpy only)."""

from __future__ import annotations

import ast
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from layerskip.calibration import stats
from layerskip.calibration.stats import binomial_cdf, fixed_sequence_test, isotonic_increasing, local_error_curve


@pytest.mark.parametrize("n,p", [(1, 0.3), (10, 0.05), (37, 0.5), (200, 0.01)])
def test_binomial_cdf_equals_exact_sum(n, p):
    q = Fraction(str(p))
    for k in range(-1, n + 1):
        exact = sum(comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(0, k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)


def test_binomial_cdf_is_accurate_for_calibration_sized_samples():
    # n and k of a real test half: the log-space sum stays accurate where the terms are tiny.
    n, k, p = 9632, 1, Fraction("0.001")
    exact = (1 - p) ** n + n * p * (1 - p) ** (n - 1)
    assert binomial_cdf(k, n, 0.001) == pytest.approx(float(exact), rel=1e-9)


def test_fixed_sequence_stops_at_the_first_failure():
    # n = 1000, delta = 0.1: 50 losses rejects "risk > 0.1", 150 does not; member 3 would
    # pass again but is never reached.
    losses = [0, 50, 150, 0]
    result = fixed_sequence_test(lambda i: losses[i], len(losses), 1000, 0.1, 0.05)
    assert result.chosen == 1
    assert [t["index"] for t in result.tested] == [0, 1, 2]
    assert result.tested[1]["p_value"] <= 0.05 < result.tested[2]["p_value"]
    none = fixed_sequence_test(lambda i: 500, 3, 1000, 0.1, 0.05)
    assert none.chosen == -1 and len(none.tested) == 1


def test_isotonic_fit_is_monotone_and_preserves_mass():
    values = np.array([0.1, 0.5, 0.2, 0.4, 0.3, 0.9])
    weights = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 1.0])
    fit = isotonic_increasing(values, weights)
    assert np.all(np.diff(fit) >= 0)
    assert (fit * weights).sum() == pytest.approx((values * weights).sum())
    assert np.array_equal(isotonic_increasing(np.sort(values), weights), np.sort(values))


def test_local_error_curve_rises_as_confidence_falls():
    rng = np.random.default_rng(0)
    conf = rng.random(5000)
    agree = rng.random(5000) < conf  # the more confident, the more often right
    lows, rate = local_error_curve(conf, agree, max_bins=50)
    assert len(lows) == len(rate) == 50
    assert np.all(np.diff(lows) <= 0) and np.all(np.diff(rate) >= 0)
    assert rate[0] < 0.1 and rate[-1] > 0.9


def test_stats_imports_no_torch():
    imported = set()
    for node in ast.walk(ast.parse(open(stats.__file__, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported and imported <= {"__future__", "math", "collections", "dataclasses", "numpy"}

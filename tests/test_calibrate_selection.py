"""Calibration's choice of the checked layers by their cost (layerskip.calibration.selection)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_model

from layerskip import calibration as cal
from layerskip.errors import ConfigError

NUM_LAYERS = 5
COSTS = cal.CheckCosts(check=0.3, exit_head=0.0, full_head=2.5, propagate=0.05)


def synthetic_scores(n: int = 40_000, seed: int = 0) -> cal.ExitScores:
    """Layer 1 is confident and right on a third of the tokens; layers 2-4 are sure of almost nothing,
    so checking them costs every token a check and saves next to none."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n) < 1 / 3
    confidence = rng.uniform(0.0, 0.6, (NUM_LAYERS - 1, n)).astype(np.float32)
    confidence[0, easy] = rng.uniform(0.9, 1.0, easy.sum())
    rare = rng.random((NUM_LAYERS - 2, n)) < 0.005
    confidence[1:][rare] = rng.uniform(0.9, 1.0, rare.sum())
    agree = rng.random((NUM_LAYERS - 1, n)) < 0.5
    agree[0, easy] = rng.random(easy.sum()) < 0.995
    agree[1:][rare] = True
    return cal.ExitScores(confidence, agree, np.arange(n) // 64, NUM_LAYERS, "softmax", seq_len=64)


@pytest.mark.parametrize("method", ["per-layer", "global"])
def test_checks_that_cost_more_than_they_save_are_dropped(method):
    scores = synthetic_scores()
    every = cal.calibrate_scores(scores, delta=0.02, method=method)
    chosen = cal.calibrate_scores(scores, delta=0.02, method=method, costs=COSTS)
    selection = chosen.extra["layer_selection"]
    assert selection["allowed_layers"] == [1, 2, 3, 4] and selection["selected_layers"] == [1]
    assert every.extra["layer_selection"] == {"selection": "all"}
    assert all(math.isfinite(t) for t in every.thresholds)
    assert math.isfinite(chosen.thresholds[0]) and all(math.isinf(t) for t in chosen.thresholds[1:])
    spent = selection["learn_half_cost_per_token"]
    assert spent["selected"] < spent["allowed"]
    # on the test half too: fewer checks, no fewer layer-1 exits, the risk still within delta
    _, every_exits = cal.policy_disagreements(scores, every.thresholds)
    _, chosen_exits = cal.policy_disagreements(scores, chosen.thresholds)
    assert (COSTS.token_costs(chosen_exits, chosen.thresholds, NUM_LAYERS).mean()
            < COSTS.token_costs(every_exits, every.thresholds, NUM_LAYERS).mean())
    assert chosen.test_risk <= 0.02


def test_free_checks_keep_a_layer_that_exits_tokens():
    free = cal.CheckCosts(check=0.0, exit_head=0.0, full_head=2.5, propagate=0.0)
    chosen = cal.calibrate_scores(synthetic_scores(), delta=0.02, method="per-layer", costs=free)
    assert 1 in chosen.extra["layer_selection"]["selected_layers"]


def test_the_choice_reads_the_learn_half_only():
    """Scrambling the test half's scores changes the test, never which layers are checked."""
    scores = synthetic_scores()
    learn, _ = cal.split_scores(scores, 0.5, 0)
    in_learn = np.isin(scores.window, np.unique(learn.window))
    scrambled = scores.confidence.copy()
    scrambled[:, ~in_learn] = np.random.default_rng(9).uniform(0, 1, (NUM_LAYERS - 1, (~in_learn).sum()))
    other = cal.ExitScores(scrambled, scores.agree, scores.window, NUM_LAYERS, "softmax", seq_len=64)
    a = cal.calibrate_scores(scores, delta=0.02, method="per-layer", costs=COSTS)
    b = cal.calibrate_scores(other, delta=0.02, method="per-layer", costs=COSTS)
    assert a.extra["layer_selection"] == b.extra["layer_selection"]


def test_token_costs_count_blocks_checks_heads_and_propagation():
    exits = np.array([1, 3, 5])
    thresholds = [0.5, math.inf, 0.7, 0.9]  # layers 1, 3 and 4 checked
    got = COSTS.token_costs(exits, thresholds, NUM_LAYERS)
    want = [1 + 0.3 + 4 * 0.05, 3 + 2 * 0.3 + 2 * 0.05, 5 + 3 * 0.3 + 2.5]
    assert np.allclose(got, want)


def test_weight_costs_are_the_weights_each_piece_reads_over_a_block():
    model = tiny_model(seed=0)
    block = sum(p.numel() for p in model.layers[0].parameters())
    width, vocab = model.config.d_model, model.config.vocab_size
    softmax = cal.weight_costs(model, "softmax", 20)
    assert softmax.check == pytest.approx(20 * width / block) and softmax.exit_head == 0
    assert softmax.full_head == pytest.approx(vocab * width / block)
    assert cal.weight_costs(model, "margin", None).check == pytest.approx(vocab * width / block)
    saturation = cal.weight_costs(model, "saturation", 20)
    assert saturation.check == 0 and saturation.exit_head == pytest.approx(20 * width / block)
    learned = cal.weight_costs(model, "classifier", 40, classifier_vocab=20, classifier_hidden=8)
    assert learned.check == pytest.approx((20 * width + 8 * (width + 3)) / block)
    assert learned.exit_head == pytest.approx(40 * width / block)
    assert cal.weight_costs(model, "classifier", 20, classifier_vocab=20).exit_head == 0  # the check's logits exit
    assert cal.weight_costs(model, "softmax", 20, check_cost=0.25).check == 0.25


def test_bad_selection_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="selection"):
        cal.selection.check_selection("some", None)
    with pytest.raises(ConfigError, match="check cost"):
        cal.selection.check_selection("cost", -1.0)

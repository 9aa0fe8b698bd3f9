"""The classifier measure: fitting CALM's exit classifier, its weights in the thresholds file, DEE with it.

The Learn-then-Test statistics themselves are tested in test_calibrate*.py; here the
classifier's own path: fit on the learn half only, saved and refused like thresholds, and
the policy DEE runs equal to the one calibrated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from layerskip import calibration as cal
from layerskip.calibration.classifier import classifier_scores, fit_classifier, fit_network
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.decoding.measures import ExitClassifier, classifier_features
from layerskip.errors import ConfigError

NUM_LAYERS = 4  # tiny_model's
WIDTH = 32 + 2  # tiny_model's d_model + the cosine and the short head's maximum
PROMPT = [5, 17, 3, 42, 8, 11]


def random_text(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, n)


def random_classifier(seed: int = 0, hidden: int = 0, vocab: int = 20, layers=(1, 2, 3)) -> ExitClassifier:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, WIDTH)] if hidden == 0 else [(hidden, WIDTH), (1, hidden)]
    return ExitClassifier(vocab=vocab, layers={layer: [(torch.randn(s, generator=g) * 0.3, torch.randn(s[0], generator=g))
                                                     for s in shapes] for layer in layers})


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=0)
    model.set_token_counts(torch.from_numpy(np.random.default_rng(5).integers(0, 1000, 97)))
    return model


@pytest.fixture(scope="module")
def features(model):
    return cal.exit_scores(model, random_text(3200, 1), "classifier", batch_size=50, classifier_vocab=20)


# ----------------------------------------------------------------------------- fitting


def separable(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose label is the sign of a shifted, scaled combination (separable by a hyperplane)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0
    y = ((x[:, 0] - 4) + 0.1 * (x[:, 1] - 4) - 10 * (x[:, 2] - 4) > 0).double()
    return x, y


@pytest.mark.parametrize("hidden", [0, 8])
def test_fit_separates_separable_features_and_is_deterministic(hidden):
    x, y = separable()
    net = fit_network(x, y, hidden, seed=3)
    clf = ExitClassifier(vocab=2, layers={1: net})
    p = clf.score(1, x.float())
    assert ((p > 0.5) == (y > 0.5)).float().mean() >= 0.99  # standardisation folded in: raw features score
    assert (p[y > 0.5].min() > p[y < 0.5].max()) or hidden  # logistic regression ranks them perfectly
    again = fit_network(x, y, hidden, seed=3)
    assert all(torch.equal(a, b) for pair in zip(net, again) for a, b in zip(*pair))
    # The check can fail: labels unrelated to the features leave it at chance.
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    q = ExitClassifier(vocab=2, layers={1: fit_network(x, shuffled, hidden, seed=3)}).score(1, x.float())
    assert ((q > 0.5) == (shuffled > 0.5)).float().mean() < 0.8


def test_features_are_the_hidden_state_the_cosine_and_the_short_heads_maximum(model):
    h, prev = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    feats, (short, ids) = classifier_features(model, h, prev, 20)
    assert feats.shape == (2, 3, WIDTH) and short.shape == (2, 3, 20) and ids.shape == (20,)
    torch.testing.assert_close(feats[..., :32], h / h.pow(2).mean(-1, keepdim=True).add(model.norm.eps).sqrt())
    torch.testing.assert_close(feats[..., 32], torch.nn.functional.cosine_similarity(h, prev, dim=-1))
    torch.testing.assert_close(feats[..., 33], torch.softmax(model.unembed(h)[..., ids], -1).amax(-1))


@pytest.mark.parametrize("hidden", [0, 4])
def test_the_decoding_check_scores_the_features(hidden):
    """confidence() (one fused product) = score(classifier_features()), also after the head's weights change."""
    model = tiny_model(seed=3)
    clf = random_classifier(seed=1, hidden=hidden)
    h, prev = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    for _ in range(2):
        conf, (short, ids) = clf.confidence(model, h, prev, 2)
        feats, (ref_short, ref_ids) = classifier_features(model, h, prev, 20)
        torch.testing.assert_close(conf, clf.score(2, feats), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(short, ref_short, rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, ref_ids) and conf.shape == (3, 5)
        with torch.no_grad():
            model.lm_head.weight.mul_(2.0)  # a stale fused head would show on the second pass


def test_the_classifier_is_fit_on_the_learn_half_only(features):
    """Changing every test-half feature changes nothing about the fitted classifier."""
    checked = [True] * (NUM_LAYERS - 1)
    learn, test = cal.split_scores(features, 0.5, seed=0)
    fitted = fit_classifier(learn, checked)
    noisy = features.features.copy()
    in_test = np.isin(features.window, np.unique(test.window))
    noisy[:, in_test] = np.random.default_rng(0).normal(size=noisy[:, in_test].shape)
    refit = fit_classifier(cal.split_scores(dataclasses.replace(features, features=noisy), 0.5, seed=0)[0], checked)
    assert refit.to_record() == fitted.to_record()
    out = cal.calibrate_scores(features, delta=0.3, epsilon=0.1)
    assert out.classifier.to_record() == fitted.to_record()  # calibrate fits exactly this
    assert out.classifier.info["fit"]["learn_tokens"] == learn.num_tokens


def test_only_checked_layers_get_a_classifier(features):
    out = cal.calibrate_scores(features, delta=0.3, min_exit_layer=2, check_every=2)
    assert sorted(out.classifier.layers) == [2] and out.thresholds[0] == out.thresholds[2] == math.inf


@pytest.mark.parametrize("kwargs,match", [(dict(classifier_hidden=-1), "classifier_hidden"),
                                          (dict(classifier_fit_tokens=1), "classifier_fit_tokens")])
def test_bad_classifier_settings(features, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cal.calibrate_scores(features, delta=0.3, **kwargs)


# ----------------------------------------------------------------------------- DEE with the classifier


@pytest.mark.parametrize("hidden,exit_vocab,min_exit_layer", [(0, None, 1), (4, 20, 2), (0, 6, 1)])
def test_unreachable_threshold_equals_the_full_model(model, hidden, exit_vocab, min_exit_layer):
    dee = DynamicEarlyExit(1.5, "classifier", min_exit_layer, exit_vocab=exit_vocab,
                           classifier=random_classifier(hidden=hidden))
    result = dee.generate(model, PROMPT, 16)
    reference = DynamicEarlyExit(math.inf).generate(model, PROMPT, 16)  # autoregressive greedy
    assert result.tokens == reference.tokens and result.stats["exit_layers"] == [NUM_LAYERS] * 16
    checks = NUM_LAYERS - min_exit_layer
    assert result.stats["short_head_evals_per_token"] == checks and result.stats["head_evals_per_token"] == 1


def test_threshold_zero_exits_through_the_exit_head_and_reuses_the_classifiers(model):
    clf = random_classifier()
    same = DynamicEarlyExit(0.0, "classifier", exit_vocab=20, classifier=clf).generate(model, PROMPT, 8)
    assert same.stats["exit_layers"] == [1] * 8 and same.stats["short_head_evals_per_token"] == 1
    full = DynamicEarlyExit(0.0, "classifier", classifier=clf).generate(model, PROMPT, 8)
    assert full.stats["head_evals_per_token"] == 1 and full.stats["short_head_evals_per_token"] == 1
    assert full.tokens == DynamicEarlyExit(0.0).generate(model, PROMPT, 8).tokens  # layer-1 model's greedy


def test_calibrated_scores_are_the_policy_dee_runs(model):
    """For each prompt, DEE's first token exits where the teacher-forced classifier scores say."""
    clf = random_classifier(seed=2, hidden=4)
    text = random_text(24 * 6, 4)
    s = cal.exit_scores(model, text, "classifier", seq_len=24, batch_size=6, classifier=clf)
    assert s.features is None and s.classifier is clf
    thresholds = [float(np.median(s.confidence[0])), math.inf, float(np.median(s.confidence[2]))]
    exits = cal.policy_exit_layers(s.confidence, thresholds)
    dee = DynamicEarlyExit(thresholds, "classifier", classifier=clf)
    for w in range(6):
        result = dee.generate(model, [int(t) for t in text[w * 24 : (w + 1) * 24]], 1)
        assert result.token_info[0]["exit_layer"] == exits[w * 24 + 23]
    assert len(set(exits[23::24].tolist())) > 1  # the check can fail: the prompts do not all exit at one layer
    # and fitting then scoring the stored features gives what scoring in the pass gives
    stored = cal.exit_scores(model, text, "classifier", seq_len=24, batch_size=6, classifier_vocab=20)
    np.testing.assert_allclose(classifier_scores(clf, stored.features), s.confidence, rtol=1e-5, atol=1e-6)


def test_the_classifier_measure_needs_its_weights(model):
    with pytest.raises(ConfigError, match="only a calibration fits.*--thresholds FILE"):
        DynamicEarlyExit(0.9, "classifier")
    with pytest.raises(ConfigError, match="belong to measure 'classifier'"):
        DynamicEarlyExit(0.9, "softmax", classifier=random_classifier())
    with pytest.raises(ConfigError, match="no weights for layer"):
        DynamicEarlyExit(0.5, "classifier", classifier=random_classifier(layers=(1, 2))).generate(model, PROMPT, 2)
    narrow = ExitClassifier(vocab=20, layers={layer: [(torch.zeros(1, 10), torch.zeros(1))] for layer in (1, 2, 3)})
    with pytest.raises(ConfigError, match="reads 10 features.*d_model 32"):
        DynamicEarlyExit(0.5, "classifier", classifier=narrow).generate(model, PROMPT, 2)

"""Fitting CALM's learned exit classifier (``measures.ExitClassifier``) on the learn half.

Per checked exit layer, a logistic regression (``hidden=0``) or a one-hidden-layer MLP
predicts whether the exit's top-1 equals the last layer's top-1 from the exit's classifier
features. It is fit on the learn half's tokens only (at most ``fit_tokens`` of them, a
seeded sample), so the test half that Learn-then-Test counts on never touches it: the
classifier is part of the policy the guarantee covers. Full-batch L-BFGS on standardised
features with a small L2 penalty, in float32 on the CPU: deterministic given the seed (and
the machine's thread count). The default, a 32-unit MLP fit by 200 L-BFGS iterations on
up to 65,536 tokens, was chosen by measurement against logistic regression, smaller MLPs
and fewer tokens or iterations (``benchmarks/exit_shares.py`` compares the measures).
"""

from __future__ import annotations

import numpy as np
import torch

from layerskip.calibration.scores import ExitScores
from layerskip.decoding.measures import ExitClassifier, Layer
from layerskip.errors import ConfigError

DEFAULT_HIDDEN = 32  # units of the MLP's hidden layer (0: logistic regression)
FIT_TOKENS = 65536  # learn-half tokens a layer's classifier is fit on, at most
L2 = 1e-4  # penalty on the weights (standardised inputs), so separable layers keep finite weights
MAX_ITER = 200


def check_classifier_settings(hidden: int, fit_tokens: int) -> None:
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ConfigError(f"classifier_hidden must be an integer >= 0 (0: logistic regression), got {hidden!r}")
    if isinstance(fit_tokens, bool) or not isinstance(fit_tokens, int) or fit_tokens < 2:
        raise ConfigError(f"classifier_fit_tokens must be an integer >= 2, got {fit_tokens!r}")


def fit_classifier(learn: ExitScores, checked: list[bool], *, hidden: int = DEFAULT_HIDDEN, seed: int = 0,
                   fit_tokens: int = FIT_TOKENS) -> ExitClassifier:
    """An ExitClassifier for every checked layer, fit on the learn half's features and agreements."""
    check_classifier_settings(hidden, fit_tokens)
    if learn.features is None or learn.classifier_vocab is None:
        raise ConfigError("fitting an exit classifier needs exit scores with classifier features "
                          "(exit_scores(..., measure='classifier') without a classifier)")
    rng = np.random.default_rng(seed)
    n = learn.num_tokens
    sample = np.sort(rng.permutation(n)[:fit_tokens]) if n > fit_tokens else np.arange(n)
    layers = {}
    for row, on in enumerate(checked):
        if on:
            x = torch.from_numpy(learn.features[row, sample]).float()  # (n, F)
            y = torch.from_numpy(learn.agree[row, sample]).float()  # (n,)
            layers[row + 1] = fit_network(x, y, hidden, seed=seed + row)
    info = {"fit": {"model": "logistic regression" if hidden == 0 else f"MLP, one hidden layer of {hidden} (ReLU)",
                    "learn_tokens": int(sample.size), "l2": L2, "seed": seed,
                    "note": "fit on the learn half only; standardisation folded into the first layer"}}
    return ExitClassifier(vocab=learn.classifier_vocab, layers=layers, info=info)


def fit_network(x: torch.Tensor, y: torch.Tensor, hidden: int, *, seed: int = 0) -> Layer:
    """Linear layers (float32) whose sigmoid output fits P(y = 1 | x); x (n, F), y (n,) in {0, 1}, fit in x's dtype."""
    mean, scale = x.mean(0), x.std(0)
    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))  # constant features stay as they are
    z = (x - mean) / scale
    params = _initial(z.shape[1], hidden, torch.Generator().manual_seed(seed), x.dtype)
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=MAX_ITER, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        out = torch.nn.functional.binary_cross_entropy_with_logits(_forward(params, z), y)
        out = out + 0.5 * L2 * sum((w * w).sum() for w in params[::2])
        out.backward()
        return out

    optimizer.step(loss)
    first_w, first_b = params[0].detach(), params[1].detach()
    # Fold the standardisation in: W ((x - m) / s) + b = (W / s) x + (b - W (m / s)).
    folded = [(first_w / scale, first_b - first_w @ (mean / scale))]
    folded += [(params[i].detach(), params[i + 1].detach()) for i in range(2, len(params), 2)]
    return [(w.float().contiguous(), b.float().contiguous()) for w, b in folded]


def _initial(features: int, hidden: int, generator: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    """[W1, b1(, W2, b2)] requiring grad: zeros for logistic regression, seeded for an MLP."""
    if hidden == 0:
        tensors = [torch.zeros(1, features, dtype=dtype), torch.zeros(1, dtype=dtype)]
    else:
        tensors = [torch.randn(hidden, features, generator=generator, dtype=dtype) / features ** 0.5,
                   torch.zeros(hidden, dtype=dtype),
                   torch.randn(1, hidden, generator=generator, dtype=dtype) / hidden ** 0.5,
                   torch.zeros(1, dtype=dtype)]
    return [t.requires_grad_() for t in tensors]


def _forward(params: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Logits (n,) of the network in params on standardised inputs z (n, F)."""
    out = z
    for i in range(0, len(params), 2):
        out = torch.nn.functional.linear(out, params[i], params[i + 1])
        if i + 2 < len(params):
            out = torch.relu(out)
    return out.squeeze(-1)


def classifier_scores(classifier: ExitClassifier, features: np.ndarray) -> np.ndarray:
    """Confidence (L-1, N) of features (L-1, N, F): the classifier's score where it has a layer, 0 elsewhere."""
    conf = np.zeros(features.shape[:2], dtype=np.float32)
    for layer in classifier.layers:
        with torch.no_grad():
            conf[layer - 1] = classifier.score(layer, torch.from_numpy(features[layer - 1])).numpy()
    return conf

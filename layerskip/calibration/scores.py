"""Exit scores: one teacher-forced pass with every exit over validation windows.

For every token and every layer l < L it records the confidence c_l and whether exit l's
top-1 equals the final layer's top-1; everything after this pass is counting. The
``classifier`` measure without a classifier records each exit's classifier features
instead (``measures.classifier_features``): ``calibrate_scores`` fits the classifier on the
learn half's and then scores every token with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from layerskip.config import check_measure
from layerskip.decoding.dee import check_policy, exit_head
from layerskip.decoding.measures import (
    CLASSIFIER_VOCAB,
    ExitClassifier,
    classifier_features,
    logit_confidence,
    saturation_confidence,
)
from layerskip.errors import ConfigError
from layerskip.evaluation import default_window
from layerskip.fastpath import decoding


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
    features: np.ndarray | None = None  # (L-1, N, C+2) float32: classifier features, when no classifier scored them
    classifier: ExitClassifier | None = None  # the classifier whose scores `confidence` holds
    classifier_vocab: int | None = None  # the features' short head

    @property
    def num_tokens(self) -> int:
        return int(self.agree.shape[1])

    @property
    def num_windows(self) -> int:
        return int(np.unique(self.window).size)

    def subset(self, mask: np.ndarray) -> ExitScores:
        features = None if self.features is None else self.features[:, mask]
        return ExitScores(self.confidence[:, mask], self.agree[:, mask], self.window[mask], self.num_layers,
                          self.measure, self.seq_len, self.exit_vocab, features, self.classifier,
                          self.classifier_vocab)


def windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> list[np.ndarray]:
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
    classifier: ExitClassifier | None = None,
    classifier_vocab: int = CLASSIFIER_VOCAB,
) -> ExitScores:
    """One forward pass with all exits over windows of `tokens` (validation text).

    For every position (every window position is a prediction), every layer l < L: its
    confidence under `measure` and whether its top-1 equals the final layer's top-1. With
    `exit_vocab`, early exits read the short head as DEE does (confidence over those tokens,
    top-1 among them). Measure "classifier": `classifier`'s scores (layers it has no weights
    for score 0), or without one the features for fitting one (short head of `classifier_vocab`).
    """
    check_measure(measure)
    check_policy(1, 1, exit_vocab)
    if classifier is not None:
        if measure != "classifier":
            raise ConfigError(f"an exit classifier was given with the {measure!r} measure")
        classifier.check_model(model)
        classifier_vocab = classifier.vocab
    if measure == "classifier" and not (isinstance(classifier_vocab, int) and classifier_vocab >= 2):
        raise ConfigError(f"classifier_vocab must be an integer >= 2 (tokens in the classifier's short head), "
                          f"got {classifier_vocab!r}")
    num_layers = model.num_layers
    if num_layers == 1:
        raise ConfigError("a 1-layer model has no early exits to calibrate")
    seq_len = min(seq_len or default_window(model.config.max_seq_len), model.config.max_seq_len)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < seq_len:
        seq_len = len(tokens)
    if seq_len < 1:
        raise ConfigError("no calibration tokens: the held-out text is empty")
    device = model.embed_tokens.weight.device
    scorer = ExitScorer(measure, exit_vocab, classifier, classifier_vocab if measure == "classifier" else None)
    confs, agrees, feats, window_ids = [], [], [], []
    batches = windows(np.asarray(tokens), seq_len, batch_size)
    window_id = 0
    for b, batch in enumerate(batches):
        x = torch.from_numpy(batch).to(device)  # (B, T)
        conf, agree, feat = scorer.batch(model, x)
        confs.append(conf)
        agrees.append(agree)
        feats.append(feat)
        window_ids.append(np.repeat(np.arange(window_id, window_id + x.shape[0]), seq_len))
        window_id += x.shape[0]
        if progress is not None:
            progress(b + 1, len(batches))
    return ExitScores(
        confidence=np.concatenate(confs, axis=1),
        agree=np.concatenate(agrees, axis=1),
        window=np.concatenate(window_ids),
        num_layers=num_layers,
        measure=measure,
        seq_len=seq_len,
        exit_vocab=exit_vocab,
        features=None if feats[0] is None else np.concatenate(feats, axis=1),
        classifier=classifier,
        classifier_vocab=scorer.classifier_vocab,
    )


@dataclass
class ExitScorer:
    """How one batch of windows is scored: the exit head, the measure, and the classifier or its features."""

    measure: str
    exit_vocab: int | None
    classifier: ExitClassifier | None
    classifier_vocab: int | None  # the features' short head (measure "classifier" only)

    def batch(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(confidence (L-1, B*T), agreement (L-1, B*T), features (L-1, B*T, C+2) or None) of the windows x (B, T)."""
        out = model(x, exits=range(1, model.num_layers), compute_logits=False)
        final = model.unembed(out.hidden).argmax(-1)  # (B, T)
        prev = model.embed(x)
        conf_rows, agree_rows, feature_rows = [], [], []
        for layer in range(1, model.num_layers):
            h = out.exit_hidden[layer]
            logits, ids = exit_head(model, h, self.exit_vocab, {"full": 0, "short": 0})  # (B, T, V or N)
            top1 = logits.argmax(-1) if ids is None else ids[logits.argmax(-1)]
            agree_rows.append((top1 == final).flatten().cpu())
            conf = self._confidence(model, layer, h, prev, logits, feature_rows)
            conf_rows.append(conf.flatten().float().cpu())
            prev = h
        features = torch.stack(feature_rows).numpy() if feature_rows else None
        return torch.stack(conf_rows).numpy(), torch.stack(agree_rows).numpy(), features

    def _confidence(self, model: torch.nn.Module, layer: int, h: torch.Tensor, prev: torch.Tensor,
                    logits: torch.Tensor, feature_rows: list[torch.Tensor]) -> torch.Tensor:
        if self.measure == "saturation":
            return saturation_confidence(h, prev)
        if self.measure != "classifier":
            return logit_confidence(logits, self.measure)
        features, _ = classifier_features(model, h, prev, self.classifier_vocab)  # (B, T, C+2)
        if self.classifier is None:  # record them; the classifier is fit (and scores them) later
            feature_rows.append(features.flatten(0, -2).float().cpu())
            return torch.zeros(h.shape[:-1])
        if layer not in self.classifier.layers:  # never checked there
            return torch.zeros(h.shape[:-1])
        return self.classifier.score(layer, features)

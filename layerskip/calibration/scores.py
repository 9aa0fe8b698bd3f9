"""Exit scores: one teacher-forced pass with every exit over validation windows.

For every token and every layer l < L it records the confidence c_l and whether exit l's
top-1 equals the final layer's top-1; everything after this pass is counting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from layerskip.config import check_measure
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.decoding.measures import logit_confidence, saturation_confidence
from layerskip.errors import ConfigError
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

    @property
    def num_tokens(self) -> int:
        return int(self.agree.shape[1])

    @property
    def num_windows(self) -> int:
        return int(np.unique(self.window).size)

    def subset(self, mask: np.ndarray) -> ExitScores:
        return ExitScores(self.confidence[:, mask], self.agree[:, mask], self.window[mask], self.num_layers,
                          self.measure, self.seq_len, self.exit_vocab)


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
    confs, agrees, window_ids = [], [], []
    batches = windows(np.asarray(tokens), seq_len, batch_size)
    window_id = 0
    for b, batch in enumerate(batches):
        x = torch.from_numpy(batch).to(device)  # (B, T)
        conf, agree = _batch_scores(model, strategy, x)
        confs.append(conf)
        agrees.append(agree)
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
    )


def _batch_scores(model: torch.nn.Module, strategy: DynamicEarlyExit, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, agreement) of exits 1..L-1 for every position of the windows x (B, T), each (L-1, B*T)."""
    out = model(x, exits=range(1, model.num_layers), compute_logits=False)
    final = model.unembed(out.hidden).argmax(-1)  # (B, T)
    prev = model.embed(x)
    conf_rows, agree_rows = [], []
    for layer in range(1, model.num_layers):
        h = out.exit_hidden[layer]
        logits, ids = strategy.exit_head(model, h, {"full": 0, "short": 0})  # (B, T, V or N)
        top1 = logits.argmax(-1) if ids is None else ids[logits.argmax(-1)]
        agree_rows.append((top1 == final).flatten().cpu())
        if strategy.measure == "saturation":
            conf = saturation_confidence(h, prev)
        else:
            conf = logit_confidence(logits, strategy.measure)
        conf_rows.append(conf.flatten().float().cpu())
        prev = h
    return torch.stack(conf_rows).numpy(), torch.stack(agree_rows).numpy()

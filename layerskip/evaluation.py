"""Per-layer evaluation: every exit 1..L from one pass through the trunk.

Each exit's loss is the mean NLL per token over non-overlapping windows that cover the
split once (``layerskip.data.eval_windows``); token-level perplexity is exp(loss) and
word-level perplexity is exp(total NLL / words), the literature's number.

The same pass measures how often each exit predicts what the last layer predicts
(teacher-forced): top-1 agreement (the exit's argmax is the last layer's argmax, as DEE and
calibration count it), and the share of tokens whose last-layer top-1 is within the exit's
top-2 and top-4.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from layerskip.data import eval_windows
from layerskip.losses import IGNORE_INDEX
from layerskip.model import Transformer

if TYPE_CHECKING:
    from layerskip.checkpoint import Checkpoint


@dataclass
class LayerEval:
    layer: int  # exit after this many blocks
    loss: float  # mean NLL per token (nats)
    token_ppl: float
    word_ppl: float | None  # None when only part of the split was read
    # share of predicted tokens where this exit's top-1 is the last layer's top-1 (1.0 at the last layer)
    agreement: float | None = None
    last_in_top2: float | None = None  # share where the last layer's top-1 is within this exit's top-2
    last_in_top4: float | None = None  # ... within its top-4


@dataclass
class EvalResult:
    split: str
    tokens: int  # predicted tokens
    words: int | None  # words of the whole split (None if unknown or partial)
    layers: list[LayerEval]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> LayerEval:
        return self.layers[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A readable per-layer table."""
        lines = [f"{self.split}: {self.tokens:,} tokens" + (f", {self.words:,} words" if self.words else ""),
                 f"{'exit':>5} {'loss':>8} {'token ppl':>10} {'word ppl':>10} {'agree':>6} {'top-2':>6} {'top-4':>6}"]
        for r in self.layers:
            word = f"{r.word_ppl:10.2f}" if r.word_ppl is not None else f"{'-':>10}"
            shares = " ".join(f"{v:6.3f}" if v is not None else f"{'-':>6}"
                              for v in (r.agreement, r.last_in_top2, r.last_in_top4))
            lines.append(f"{r.layer:>5} {r.loss:8.4f} {r.token_ppl:10.2f} {word} {shares}")
        lines.append("agree: share of tokens whose top-1 is the last layer's; top-2/4: the last layer's top-1 is "
                     "within the exit's top 2/4")
        return "\n".join(lines)


def default_window(max_seq_len: int) -> int:
    """Evaluation windows of a model trained elsewhere: its context, capped so that a window's logits fit in memory."""
    return min(max_seq_len, DEFAULT_WINDOW_CAP)


def _ppl(nats: float) -> float:
    return math.exp(nats) if nats < 700 else math.inf


# Llama 3's context is 131,072 tokens: one window of logits over a 128k vocabulary would not fit in memory.
DEFAULT_WINDOW_CAP = 2048
AGREEMENT_TOP = (2, 4)  # the coverage columns: the last layer's top-1 within the exit's top-k


def exit_sums(
    normed: torch.Tensor,  # (E, N, C) final-normed hidden states of exits 1..L, the last one last
    weight: torch.Tensor,  # (V, C) the LM head
    targets: torch.Tensor,  # (N,) token ids, IGNORE_INDEX for none
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL of each exit (E,) fp64, counts (E, 3) int64 of the non-ignored tokens whose
    exit agrees with the last exit at top-1, and whose last-exit top-1 is within the exit's top-2 / top-4).

    One head evaluation per chunk serves the loss and the agreement; the (E, N, V) logits never exist at once.
    """
    E, N, _ = normed.shape
    nll_sums = torch.zeros(E, dtype=torch.float64, device=normed.device)
    counts = torch.zeros(E, 1 + len(AGREEMENT_TOP), dtype=torch.int64, device=normed.device)
    with torch.no_grad():
        for s in range(0, N, chunk_size):
            t = targets[s : s + chunk_size]
            logits = (normed[:, s : s + chunk_size] @ weight.t()).float()  # (E, n, V)
            # classes along the last, contiguous dimension: cross_entropy over a transposed view is slow
            nll = F.cross_entropy(logits.flatten(0, 1), t.repeat(E), ignore_index=IGNORE_INDEX, reduction="none")
            nll_sums += nll.view(E, -1).sum(-1).double()
            counts += agreement_counts(logits, t != IGNORE_INDEX)
    return nll_sums, counts


def agreement_counts(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(E, 3) counts over the valid positions of logits (E, n, V), the last exit the reference:
    top-1 agreement, and its top-1 within each exit's top-k for k in AGREEMENT_TOP."""
    best = logits.argmax(-1)  # (E, n)
    reference = best[-1]  # (n,) the last layer's top-1
    agree = (best == reference) & valid
    # one top-k pass serves every k (counting the tokens ranked above the reference cost 4x as much)
    top = logits.topk(max(AGREEMENT_TOP), dim=-1).indices == reference.view(1, -1, 1)  # (E, n, K)
    within = [(top[..., :k].any(-1) & valid).sum(-1) for k in AGREEMENT_TOP]
    return torch.stack([agree.sum(-1), *within], dim=-1)


@torch.no_grad()
def evaluate_model(
    model: Transformer,
    tokens: np.ndarray,
    *,
    split: str = "valid",
    words: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int = 2048,
) -> EvalResult:
    """Loss and perplexity of every exit 1..L on `tokens` (one trunk pass per window).

    max_tokens: read only the first max_tokens + 1 tokens (word perplexity is then omitted).
    """
    import time

    start = time.perf_counter()
    seq_len = seq_len or model.config.max_seq_len
    L = model.num_layers
    partial = max_tokens is not None and max_tokens + 1 < len(tokens)
    if partial:
        tokens = tokens[: max_tokens + 1]
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(L, dtype=torch.float64)
    hits = torch.zeros(L, 1 + len(AGREEMENT_TOP), dtype=torch.int64)
    count = 0
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    try:
        with autocast:
            for x, y in eval_windows(tokens, seq_len, batch_size):
                x, y = x.to(device), y.to(device)
                out = model(x, exits=range(1, L + 1), compute_logits=False)
                hidden = torch.stack([out.exit_hidden[k] for k in range(1, L + 1)])  # (L, B, T, C)
                normed = model.norm(hidden).flatten(1, 2)  # (L, N, C)
                nll, agree = exit_sums(normed, model.lm_head.weight, y.flatten(), chunk_size)
                sums += nll.cpu()
                hits += agree.cpu()
                count += y.numel()
    finally:
        model.train(was_training)
    layers = []
    for k in range(1, L + 1):
        total = sums[k - 1].item()
        loss = total / max(count, 1)
        word_ppl = _ppl(total / words) if words and not partial else None
        agree, top2, top4 = (h / max(count, 1) for h in hits[k - 1].tolist())
        layers.append(LayerEval(layer=k, loss=loss, token_ppl=_ppl(loss), word_ppl=word_ppl, agreement=agree,
                                last_in_top2=top2, last_in_top4=top4))
    return EvalResult(
        split=split,
        tokens=count,
        words=None if partial else words,
        layers=layers,
        seconds=time.perf_counter() - start,
    )


def evaluate_checkpoint(
    checkpoint: Checkpoint | str | Path,
    *,
    split: str = "test",
    data_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_tokens: int | None = None,
) -> EvalResult:
    """Evaluate a loaded checkpoint, a checkpoint directory or a run directory's best one on a WikiText-2 split."""
    from layerskip.checkpoint import Checkpoint, load_checkpoint
    from layerskip.data import load_corpus
    from layerskip.device import resolve_device

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint,
                                                                                   device=resolve_device(device))
    corpus = load_corpus(data_dir, tokenizer=ckpt.tokenizer)
    seq_len = int(ckpt.train_config.get("seq_len", default_window(ckpt.model_config.max_seq_len)))
    result = evaluate_model(
        ckpt.model,
        corpus.tokens[split],
        split=split,
        words=corpus.words[split],
        seq_len=seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens,
    )
    result.meta = {"checkpoint": str(ckpt.path), "parameters": ckpt.model.num_parameters(),
                   "model": ckpt.model_config.to_dict(), "step": ckpt.meta.get("step")}
    return result

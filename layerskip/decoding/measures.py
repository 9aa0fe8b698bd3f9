"""Dynamic early exit's confidence measures, each in [0, 1] (their names: ``layerskip.config.MEASURES``).

- ``softmax``: the exit distribution's largest probability (the seed study's measure).
- ``margin``: top-1 minus top-2 probability.
- ``saturation``: cosine similarity of the hidden states after blocks l-1 and l (after 0
  blocks: the embedding), clamped to [0, 1]. It needs no LM head, so a token costs one
  head evaluation (at its exit) whatever the number of checked layers; with the other two
  every checked layer costs a head evaluation.
"""

from __future__ import annotations

import torch

from layerskip.config import MEASURES
from layerskip.errors import ConfigError

HIDDEN_MEASURES = ("saturation",)  # computed from hidden states, without the head
LOGIT_MEASURES = tuple(m for m in MEASURES if m not in HIDDEN_MEASURES)


def logit_confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """Confidence of exit logits (..., V) -> (...): softmax maximum or top-1 minus top-2."""
    if measure not in LOGIT_MEASURES:
        raise ConfigError(f"measure {measure!r} is not computed from logits")
    probs = torch.softmax(logits.float(), dim=-1)  # one kernel: cheaper per check than logsumexp
    if measure == "softmax":
        return probs.amax(dim=-1)
    top2 = torch.topk(probs, 2, dim=-1).values  # (..., 2)
    return top2[..., 0] - top2[..., 1]


def saturation_confidence(hidden: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of consecutive layers' hidden states (..., C) -> (...), clamped to [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
    return cos.clamp(0.0, 1.0)

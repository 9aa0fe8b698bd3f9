"""What every decoding strategy shares: sampling settings, the result type, prompt checks.

A strategy (autoregressive, self-speculative, dynamic early exit) is a small object with
``generate(model, prompt_ids, max_new_tokens, ...) -> GenerationResult``. Randomness flows
through an explicit ``torch.Generator``; nothing reads global RNG state.

Prompt policy (documented in README): an empty prompt, or one that leaves no room in the
context for a single new token, is a ``PromptError``. When ``prompt + max_new_tokens``
exceeds the context, generation stops when the context is full and the result says so
(``stop_reason == "context"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from layerskip.errors import ConfigError, PromptError

OnTokens = Callable[[list[int]], None]  # called with newly committed tokens, for streaming


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k / top_p restrict sampling (None: off)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"temperature must be a number >= 0 (0 means greedy), got {t!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ConfigError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        p = self.top_p
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Logits (..., V) -> the distribution sampling draws from (temperature, top-k, top-p).

    For greedy configs this is a one-hot on the argmax, so speculative acceptance rules
    reduce to "accept when the draft equals the argmax".
    """
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def check_prompt(prompt_ids: Sequence[int], max_new_tokens: int, max_seq_len: int) -> int:
    """Validate a prompt; return how many new tokens fit in the context (>= 1)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_length (new tokens) must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) == 0:
        raise PromptError("the prompt is empty; give at least one word of text to continue")
    if len(prompt_ids) >= max_seq_len:
        raise PromptError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {max_seq_len}, "
            "leaving no room to generate; shorten the prompt"
        )
    return min(max_new_tokens, max_seq_len - len(prompt_ids))


@dataclass
class GenerationResult:
    """New tokens plus the statistics every strategy reports.

    Strategy-specific statistics (acceptance, exit layers, ...) go in ``stats``;
    ``token_info`` holds one small dict per new token (e.g. its exit layer, or whether it
    was an accepted draft), which the HTML report colours tokens by.
    """

    tokens: list[int]
    prompt_len: int
    strategy: str
    seconds: float = 0.0  # wall time of the whole generation, prefill included
    time_to_first_token: float = 0.0
    stop_reason: str = "length"  # "length" | "eos" | "context"
    stats: dict[str, Any] = field(default_factory=dict)
    token_info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / self.num_tokens if self.num_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "new_tokens": self.num_tokens,
            "prompt_tokens": self.prompt_len,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "ms_per_token": self.ms_per_token,
            "time_to_first_token": self.time_to_first_token,
            "stop_reason": self.stop_reason,
            **self.stats,
        }


class Strategy(Protocol):
    """A decoding strategy; see autoregressive.py, ssd.py and dee.py."""

    name: str

    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        on_tokens: OnTokens | None = None,
    ) -> GenerationResult: ...

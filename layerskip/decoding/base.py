"""What every decoding strategy shares: sampling settings, prompt checks, the decoding loop's state.

A strategy (autoregressive, self-speculative, dynamic early exit) is a small object with
``generate(model, prompt_ids, max_new_tokens, ...) -> GenerationResult``. Randomness flows
through an explicit ``torch.Generator``; nothing reads global RNG state. ``Decoding`` is the
bookkeeping of one generation (committing tokens, stopping at a stop token / the length
limit / the context, streaming, timing); ``prefill``, ``token_buffer`` and ``pick`` are the
steps every strategy's loop shares.

Prompt policy (documented in README): an empty prompt, or one that leaves no room in the
context for a single new token, is a ``PromptError``. When ``prompt + max_new_tokens``
exceeds the context, generation stops when the context is full and the result says so
(``stop_reason == "context"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from layerskip.cache import KVCache
from layerskip.device import synchronize
from layerskip.errors import ConfigError, PromptError
from layerskip.fastpath import FastDecoder
from layerskip.model import Transformer

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


def pick(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from logits (V,): the argmax when greedy, else a draw from sampling_probs."""
    if sampling.greedy:
        return int(logits.argmax())
    return sample_token(sampling_probs(logits, sampling), generator)


def stop_set(stop_ids: Collection[int]) -> frozenset[int]:
    """The tokens that end a generation, as a set; refuses a lone id, whose digits would be taken for tokens."""
    if isinstance(stop_ids, (int, str, bytes)):
        raise ConfigError(f"stop_ids must be a collection of token ids, e.g. ({stop_ids!r},), got {stop_ids!r}")
    return frozenset(int(t) for t in stop_ids)


def check_prompt(prompt_ids: Sequence[int], max_new_tokens: int, max_seq_len: int,
                 vocab_size: int | None = None) -> int:
    """Validate a prompt (and its ids, given the vocabulary's size); return how many new tokens fit in the
    context (>= 1)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_length (new tokens) must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) == 0:
        raise PromptError("the prompt is empty; give at least one word of text to continue")
    if len(prompt_ids) >= max_seq_len:
        raise PromptError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {max_seq_len}, "
            "leaving no room to generate; shorten the prompt"
        )
    if vocab_size is not None:
        outside = [int(t) for t in prompt_ids if not 0 <= int(t) < vocab_size]
        if outside:
            raise PromptError(f"prompt token id {outside[0]} is outside the model's vocabulary of {vocab_size} "
                              "ids; encode the prompt with the model's own tokenizer")
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


@dataclass
class Decoding:
    """The state of one generation: tokens committed so far, and why it stopped."""

    prompt_len: int
    max_new_tokens: int
    budget: int  # new tokens that fit: min(max_new_tokens, context - prompt)
    stop_ids: frozenset[int]  # generation ends with the first of these tokens (it is kept)
    on_tokens: OnTokens | None
    device: torch.device  # waited for before the clock is read at the end
    start: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    stop_reason: str | None = None  # set once generation must stop

    @classmethod
    def begin(
        cls,
        model: Transformer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: Collection[int],
        on_tokens: OnTokens | None,
    ) -> Decoding:
        if model.training:
            raise ValueError("generation needs the model in eval mode (dropout off); call model.eval() first")
        budget = check_prompt(prompt_ids, max_new_tokens, model.config.max_seq_len, model.config.vocab_size)
        device = model.embed_tokens.weight.device
        return cls(len(prompt_ids), max_new_tokens, budget, stop_set(stop_ids), on_tokens, device)

    @property
    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    def commit(self, new: Sequence[int]) -> int:
        """Append tokens, cut at the first end-of-sequence or the budget; returns how many were kept."""
        kept: list[int] = []
        for token in new:
            if len(self.tokens) + len(kept) >= self.budget:
                break
            kept.append(token)
            if token in self.stop_ids:
                self.stop_reason = "eos"
                break
        if kept:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.tokens.extend(kept)
            if self.on_tokens is not None:
                self.on_tokens(kept)
        if self.stop_reason is None and len(self.tokens) >= self.budget:
            self.stop_reason = "length" if self.budget == self.max_new_tokens else "context"
        return len(kept)

    def result(self, strategy: str, stats: dict | None = None, token_info: list | None = None) -> GenerationResult:
        synchronize(self.device)
        end = time.perf_counter()
        return GenerationResult(
            tokens=list(self.tokens),
            prompt_len=self.prompt_len,
            strategy=strategy,
            seconds=end - self.start,
            time_to_first_token=(self.first_token_at or end) - self.start,
            stop_reason=self.stop_reason or "length",
            stats=stats or {},
            token_info=token_info if token_info is not None else [{} for _ in self.tokens],
        )


def token_buffer(model: Transformer, prompt_ids: Sequence[int], budget: int) -> torch.Tensor:
    """(1, prompt + budget) int64 buffer holding the prompt; new tokens are written into it."""
    device = model.embed_tokens.weight.device
    buf = torch.zeros(1, len(prompt_ids) + budget, dtype=torch.long, device=device)
    buf[0, : len(prompt_ids)] = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    return buf


def prefill(fast: FastDecoder, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run prompt (1, T) through all blocks, filling the cache; returns the last hidden state (1, 1, C)."""
    model = fast.model
    h = fast.run_blocks(model.embed(prompt), 0, model.num_layers, cache=cache, pos=0)
    return h[:, -1:]


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
        stop_ids: Collection[int] = (),
        generator: torch.Generator | None = None,
        on_tokens: OnTokens | None = None,
    ) -> GenerationResult: ...

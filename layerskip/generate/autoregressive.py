"""Autoregressive decoding with the position-indexed KV cache: the yardstick of every speed-up.

Prefill the whole prompt through all L blocks in one pass, then one token per step: embed
the newest token, run blocks [0, L) at its position (writing its keys/values into the
cache), unembed, pick. Nothing else happens in the loop: no re-encoding of the sequence,
no per-step tensor allocation beyond what the blocks themselves do, inference mode, and
the token id stays a (1, 1) tensor slice of one preallocated buffer.

``Decoding`` below is the bookkeeping every strategy shares (committing tokens, stopping at
end-of-sequence / the length limit / the context, streaming, timing); self-speculative
decoding reuses it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from layerskip.cache import KVCache
from layerskip.generate.base import (
    GenerationResult,
    OnTokens,
    SamplingConfig,
    check_prompt,
    sample_token,
    sampling_probs,
)
from layerskip.model import Transformer, decoding


@dataclass
class Decoding:
    """The state of one generation: tokens committed so far, and why it stopped."""

    prompt_len: int
    max_new_tokens: int
    budget: int  # new tokens that fit: min(max_new_tokens, context - prompt)
    eos_id: int | None
    on_tokens: OnTokens | None
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
        eos_id: int | None,
        on_tokens: OnTokens | None,
    ) -> Decoding:
        if model.training:
            raise ValueError("generation needs the model in eval mode (dropout off); call model.eval() first")
        budget = check_prompt(prompt_ids, max_new_tokens, model.config.max_seq_len)
        return cls(len(prompt_ids), max_new_tokens, budget, eos_id, on_tokens)

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
            if token == self.eos_id:
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


def pick(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from logits (V,): the argmax when greedy, else a draw from sampling_probs."""
    if sampling.greedy:
        return int(logits.argmax())
    return sample_token(sampling_probs(logits, sampling), generator)


def prefill(model: Transformer, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run prompt (1, T) through all blocks, filling the cache; returns the last hidden state (1, 1, C)."""
    h = model.run_blocks(model.embed(prompt), 0, model.num_layers, cache=cache, pos=0)
    return h[:, -1:]


def token_buffer(model: Transformer, prompt_ids: Sequence[int], budget: int) -> torch.Tensor:
    """(1, prompt + budget) int64 buffer holding the prompt; new tokens are written into it."""
    device = model.embed_tokens.weight.device
    buf = torch.zeros(1, len(prompt_ids) + budget, dtype=torch.long, device=device)
    buf[0, : len(prompt_ids)] = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    return buf


class Autoregressive:
    """Plain cached decoding: prefill, then one full forward step per token."""

    name = "ar"

    def __init__(self) -> None:
        pass

    @decoding()
    def generate(
        self,
        model: Transformer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        on_tokens: OnTokens | None = None,
    ) -> GenerationResult:
        run = Decoding.begin(model, prompt_ids, max_new_tokens, eos_id, on_tokens)
        num_layers, pos = model.num_layers, len(prompt_ids)
        buf = token_buffer(model, prompt_ids, run.budget)
        cache = model.new_cache(max_len=pos + run.budget)
        logits = model.unembed(prefill(model, buf[:, :pos], cache))[0, -1]  # (V,)
        embed, run_blocks, unembed = model.embed_tokens, model.run_blocks, model.unembed
        while True:
            token = pick(logits, sampling, generator)
            run.commit((token,))
            if run.stop_reason is not None:
                break
            buf[0, pos] = token
            h = run_blocks(embed(buf[:, pos : pos + 1]), 0, num_layers, cache=cache, pos=pos)  # (1, 1, C)
            logits = unembed(h)[0, -1]
            pos += 1
        return run.result(self.name)

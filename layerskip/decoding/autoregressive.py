"""Autoregressive decoding with the position-indexed KV cache: the yardstick of every speed-up.

Prefill the prompt but its newest token through all L blocks in one pass, then one token per
step from the newest prompt token on: embed it, run blocks [0, L) at its position (writing
its keys/values into the cache), unembed, pick. Nothing else happens in the loop: no
re-encoding of the sequence, no per-step tensor allocation beyond what the blocks themselves
do, inference mode, and the token id stays a (1, 1) tensor slice of one preallocated buffer.

The newest prompt token goes through the step, not the prefill, as in SSD and DEE: a long
prefill may run other kernels than a step (oneDNN and SDPA instead of layerskip's bf16
kernels), and the first token's logits must be the same in every strategy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from layerskip.decoding.base import Decoding, GenerationResult, OnTokens, SamplingConfig, pick, prefill, token_buffer
from layerskip.fastpath import FastDecoder, decoding
from layerskip.model import Transformer


class Autoregressive:
    """Plain cached decoding: prefill, then one full forward step per token."""

    name = "ar"

    @decoding()
    def generate(
        self,
        model: Transformer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        stop_ids: Collection[int] = (),
        generator: torch.Generator | None = None,
        on_tokens: OnTokens | None = None,
    ) -> GenerationResult:
        run = Decoding.begin(model, prompt_ids, max_new_tokens, stop_ids, on_tokens)
        fast = FastDecoder.of(model)
        pos = len(prompt_ids) - 1  # the newest token's position
        buf = token_buffer(model, prompt_ids, run.budget)
        cache = model.new_cache(max_len=len(prompt_ids) + run.budget)
        if pos:
            prefill(fast, buf[:, :pos], cache)
        step = fast.step
        while True:
            _, logits, _ = step(buf[:, pos : pos + 1], pos, cache)  # blocks [0, L) and the head: (V,)
            token = pick(logits, sampling, generator)
            run.commit((token,))
            if run.stop_reason is not None:
                break
            pos += 1
            buf[0, pos] = token
        return run.result(self.name)

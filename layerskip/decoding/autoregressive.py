"""Autoregressive decoding with the position-indexed KV cache: the yardstick of every speed-up.

Prefill the whole prompt through all L blocks in one pass, then one token per step: embed
the newest token, run blocks [0, L) at its position (writing its keys/values into the
cache), unembed, pick. Nothing else happens in the loop: no re-encoding of the sequence,
no per-step tensor allocation beyond what the blocks themselves do, inference mode, and
the token id stays a (1, 1) tensor slice of one preallocated buffer.
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
        num_layers, pos = model.num_layers, len(prompt_ids)
        buf = token_buffer(model, prompt_ids, run.budget)
        cache = model.new_cache(max_len=pos + run.budget)
        logits = fast.unembed(prefill(fast, buf[:, :pos], cache))[0, -1]  # (V,)
        embed, run_blocks, unembed = model.embed_tokens, fast.run_blocks, fast.unembed
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

"""DEE measured on its own generations: a check beside the guarantee, not covered by it.

Its prefix is DEE's own output and its skipped layers hold propagated K/V, so the
teacher-forced risk does not describe it; this measures it directly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from layerskip.decoding.base import SamplingConfig
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.fastpath import decoding


@decoding()
def generated_disagreement(
    model: torch.nn.Module,
    dee: DynamicEarlyExit,
    tokens: np.ndarray,
    *,
    num_prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 32,
) -> dict[str, Any]:
    """Measure DEE on its own generations (not covered by the guarantee).

    For prompts cut from `tokens` (evenly spaced), DEE generates greedily; the full model then
    reads prompt + DEE's text once (exact K/V) and we count the DEE tokens it would not have
    chosen at the same position ("disagreement"). Also reported: the fraction of DEE tokens
    before its first departure from the full model's own greedy continuation.
    """
    prompt_len = max(1, min(prompt_len, model.config.max_seq_len - new_tokens - 1))
    count = min(num_prompts, max(0, (len(tokens) - prompt_len) // prompt_len))
    if count == 0 or new_tokens < 1:
        return {"prompts": 0, "new_tokens": 0}
    full = DynamicEarlyExit(math.inf)
    device = model.embed_tokens.weight.device
    starts = np.linspace(0, len(tokens) - prompt_len, count).astype(int)
    wrong = total = prefix = 0
    exit_sum = 0
    for s in starts:
        prompt = [int(t) for t in tokens[s : s + prompt_len]]
        out = dee.generate(model, prompt, new_tokens, sampling=SamplingConfig())
        ref = full.generate(model, prompt, len(out.tokens)).tokens
        seq = torch.tensor([prompt + out.tokens], device=device)
        preds = model(seq).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        wrong += sum(p != t for p, t in zip(preds, out.tokens))
        total += len(out.tokens)
        prefix += next((i for i, (a, b) in enumerate(zip(out.tokens, ref)) if a != b), len(out.tokens))
        exit_sum += sum(out.stats["exit_layers"])
    return {
        "prompts": int(count),
        "prompt_tokens": prompt_len,
        "new_tokens": total,
        "disagreement": wrong / total,
        "matching_prefix_fraction": prefix / total,
        "mean_exit_layer": exit_sum / total,
        "note": "measured on DEE's own greedy generations from validation prompts; not covered by the guarantee",
    }

"""How close a config's output is to AR greedy (token agreement, ROUGE-L, exact match), and how
likely the full model finds it (perplexity of the generated tokens)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from layerskip.bench.settings import Run


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 over tokens: the harmonic mean of LCS precision and recall."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def fidelity(runs: list[Run], reference: dict[int, list[int]]) -> dict[str, float | None]:
    """Agreement with AR greedy: token agreement pooled over all tokens, mean ROUGE-L, exact-match rate."""
    if not runs:
        return {"token_agreement": None, "rouge_l": None, "exact_match": None}
    positions = sum(max(len(r.tokens), len(reference[r.prompt])) for r in runs)
    same = sum(sum(a == b for a, b in zip(r.tokens, reference[r.prompt])) for r in runs)
    return {
        "token_agreement": same / positions if positions else 1.0,
        "rouge_l": statistics.fmean(rouge_l(r.tokens, reference[r.prompt]) for r in runs),
        "exact_match": sum(r.tokens == reference[r.prompt] for r in runs) / len(runs),
    }


@torch.no_grad()
def generated_perplexity(model, prompts: list[list[int]], runs: list[Run]) -> float | None:
    """exp(mean NLL) of the generated tokens (first repeat) under the full model, given their prompt."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for r in runs:
        if r.repeat != 0 or not r.tokens:
            continue
        ids = prompts[r.prompt] + r.tokens
        x = torch.tensor([ids[:-1]], device=device)
        logits = model(x).logits[0, len(prompts[r.prompt]) - 1 :].float()  # (new, V)
        target = torch.tensor(r.tokens, device=device)
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(r.tokens)
    return math.exp(nll / count) if count else None

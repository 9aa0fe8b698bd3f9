"""Sampling: top-k / top-p against a plain loop, and sampled SSD preserving the full model's distribution.

The distribution tests draw N generations with a fixed seed and compare the empirical
distribution of the first tokens with the exact one by a chi-square test at the 1e-6
level; the same statistic is shown to reject the mistakes an implementation could make
(sampling the draft's distribution, resampling a rejected draft from p instead of
normalize(max(p - q, 0))), so the test cannot pass by accident.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from layerskip.decoding import Autoregressive, SamplingConfig, SelfSpeculative, sampling_probs

# ------------------------------------------------------------------ sampling_probs


def reference_probs(logits: list[float], temperature: float, top_k: int | None, top_p: float | None) -> list[float]:
    """Temperature, top-k, top-p written as a plain loop over the vocabulary."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k else order)
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = [math.exp(scaled[i]) / z if i in keep else 0.0 for i in range(len(scaled))]
    if top_p is not None:
        kept, mass = set(), 0.0
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += probs[i]
        z = sum(probs[i] for i in kept)
        probs = [probs[i] / z if i in kept else 0.0 for i in range(len(probs))]
    return probs


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 1, 3, 10])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.9, 1.0])
def test_sampling_probs_matches_a_plain_loop(temperature, top_k, top_p):
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(5)) * 2
    got = sampling_probs(logits, SamplingConfig(temperature, top_k, top_p))
    for row in range(3):
        expected = torch.tensor(reference_probs(logits[row].tolist(), temperature, top_k, top_p))
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-6)


def test_greedy_probs_are_one_hot_on_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.9]])
    assert torch.equal(sampling_probs(logits, SamplingConfig()), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))


def test_sampled_tokens_stay_inside_top_k_and_top_p():
    model = tiny_model(seed=1, tie_embeddings=False)
    prompt = [3, 1, 4]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    for cfg in (SamplingConfig(1.0, top_k=3), SamplingConfig(1.0, top_p=0.5)):
        allowed = set(torch.nonzero(sampling_probs(logits, cfg)).flatten().tolist())
        g = torch.Generator().manual_seed(0)
        for strategy in (Autoregressive(), SelfSpeculative(1, 3)):
            firsts = {strategy.generate(model, prompt, 2, sampling=cfg, generator=g).tokens[0] for _ in range(40)}
            assert firsts <= allowed and len(firsts) > 1


# ------------------------------------------------------------------ distribution tests


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expected < 5 times are pooled into one.

    Sampling anything of probability 0 gives an infinite statistic.
    """
    n = float(counts.sum())
    if float(counts[probs == 0].sum()) > 0:
        return math.inf, 1
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double().view(1)])
    exp = torch.cat([expected[big].double(), expected[~big].sum().double().view(1)])
    if float(exp[-1]) < 5:  # pool too small to stand alone: fold it into the smallest big cell
        i = int(torch.argmin(exp[:-1]))
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def chi_square_bound(df: int, z: float = 4.753) -> float:
    """The chi-square quantile at 1 - 1e-6 (Wilson-Hilferty; z is the normal 1 - 1e-6 quantile)."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


@torch.no_grad()
def next_probs(model, prefix: list[int], cfg: SamplingConfig, exit_layer: int | None = None) -> torch.Tensor:
    return sampling_probs(model(torch.tensor([prefix]), exit_layer=exit_layer).logits[0, -1], cfg).double()


def joint_first_two(model, prompt, cfg, exit_layer=None) -> torch.Tensor:
    """Exact P(t1, t2) (V, V) under the full model (or under a shallow exit, i.e. the draft)."""
    first = next_probs(model, prompt, cfg, exit_layer)
    rows = [first[t] * next_probs(model, prompt + [t], cfg, exit_layer) for t in range(len(first))]
    return torch.stack(rows)


def empirical(strategy, model, prompt, cfg, samples: int, counted: int, seed: int) -> torch.Tensor:
    """Counts of the first `counted` of 2 new tokens over `samples` generations, flattened (V ** counted,)."""
    vocab = model.config.vocab_size
    counts = torch.zeros(vocab**counted, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        tokens = strategy.generate(model, prompt, 2, sampling=cfg, generator=g).tokens
        index = 0
        for t in tokens[:counted]:
            index = index * vocab + t
        counts[index] += 1
    return counts


def sample_counts(probs: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    draws = torch.multinomial(probs.float(), samples, replacement=True, generator=torch.Generator().manual_seed(seed))
    return torch.bincount(draws, minlength=len(probs))


def test_sampled_ssd_preserves_the_joint_distribution_of_the_first_two_tokens():
    # Vocabulary 8, draft after 1 of 4 blocks: q differs from p by ~0.4 in total variation.
    model, prompt, cfg, samples = tiny_model(seed=1, vocab_size=8, tie_embeddings=False), [5], SamplingConfig(1.0), 1500
    p = joint_first_two(model, prompt, cfg).flatten()
    q = joint_first_two(model, prompt, cfg, exit_layer=1).flatten()
    # k=1 with 2 new tokens: t1 is an accepted draft or a resampled correction; t2 is then the
    # bonus token or a plain full-model step, so every branch of the rule is exercised.
    stats = SpecStats()
    ssd = SelfSpeculative(1, 1)
    counts = empirical(stats.wrap(ssd), model, prompt, cfg, samples, 2, seed=0)
    stat, df = chi_square(counts, p)
    print(f"joint: chi2 {stat:.1f} df {df} bound {chi_square_bound(df):.1f}")
    assert stat < chi_square_bound(df), (stat, df)
    assert 0.2 < stats.acceptance < 0.9  # both accepted and rejected drafts occurred, often
    # The same test, same sample size, rejects sampling from the draft's distribution.
    wrong, wrong_df = chi_square(sample_counts(q, samples, seed=1), p)
    print(f"joint draft: chi2 {wrong:.1f} df {wrong_df}")
    assert wrong > 3 * chi_square_bound(wrong_df), (wrong, wrong_df)


@pytest.mark.parametrize(
    "cfg, threshold, draft_vocab",
    [(SamplingConfig(0.7, top_k=5, top_p=0.9), None, None), (SamplingConfig(1.0, top_p=0.95), 0.3, None),
     (SamplingConfig(1.0), None, 3)],
    ids=["topk-topp", "adaptive", "short-draft-head"],
)
def test_sampled_ssd_preserves_the_first_token_distribution(cfg, threshold, draft_vocab):
    # With a 3-token draft head the draft never proposes 5 of the 8 tokens, which the full
    # model still produces through corrections at their right rates.
    model, prompt, samples = tiny_model(seed=1, vocab_size=8), [5], 800
    p = next_probs(model, prompt, cfg)
    q = next_probs(model, prompt, cfg, exit_layer=1)
    strategy = SelfSpeculative(1, 3, adaptive_threshold=threshold, draft_vocab=draft_vocab)
    counts = empirical(strategy, model, prompt, cfg, samples, 1, seed=2)
    stat, df = chi_square(counts, p)
    print(f"first: chi2 {stat:.1f} df {df} bound {chi_square_bound(df):.1f}")
    assert stat < chi_square_bound(df), (stat, df)
    # A classic mistake: resampling a rejected draft from p itself rather than max(p - q, 0).
    accept = torch.minimum(q, p).sum()
    biased = torch.minimum(q, p) + (1 - accept) * p
    for wrong_probs in (q, biased):
        wrong, wrong_df = chi_square(sample_counts(wrong_probs, samples, seed=3), p)
        print(f"first wrong: chi2 {wrong:.1f} df {wrong_df}")
        assert wrong > chi_square_bound(wrong_df), (wrong, wrong_df)


class SpecStats:
    """Wraps a strategy to add up acceptance over many generations."""

    def __init__(self) -> None:
        self.drafted = self.accepted = 0

    def wrap(self, strategy):
        outer = self

        class Counting:
            def generate(self, *args, **kwargs):
                result = strategy.generate(*args, **kwargs)
                outer.drafted += result.stats["drafted_tokens"]
                outer.accepted += result.stats["accepted_tokens"]
                return result

        return Counting()

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted

"""Dynamic early exit on tiny fp32 models: whole token lists and cache tensors, fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from layerskip.config import GLOBAL_MEASURES
from layerskip.decoding.base import SamplingConfig, sample_token, sampling_probs
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.decoding.measures import logit_confidence, saturation_confidence
from layerskip.errors import ConfigError
from layerskip.model import apply_rotary

PROMPT = [5, 17, 3, 42, 8, 11]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct norm weights, so using the wrong norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@torch.no_grad()
def plain_loop(model, prompt, n, *, exit_layer=None, sampling=SamplingConfig(), generator=None):
    """Reference decoding: a full uncached forward over the whole sequence for every token."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), exit_layer=exit_layer).logits[0, -1]
        if sampling.greedy:
            seq.append(int(logits.argmax()))
        else:
            seq.append(sample_token(sampling_probs(logits, sampling), generator))
    return seq[len(prompt):]


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
@pytest.mark.parametrize("min_exit_layer,check_every", [(1, 1), (2, 2)])
def test_unreachable_threshold_equals_full_greedy(model, measure, min_exit_layer, check_every):
    dee = DynamicEarlyExit(1.5, measure=measure, min_exit_layer=min_exit_layer, check_every=check_every)
    result = dee.generate(model, PROMPT, 20)
    assert result.tokens == plain_loop(model, PROMPT, 20)
    assert result.stats["exit_layers"] == [model.num_layers] * 20
    assert result.stats["mean_exit_layer"] == model.num_layers
    assert result.stats["kv_projections_per_token"] == 0
    checked = len(range(min_exit_layer, model.num_layers, check_every))
    expected_heads = 1 if measure == "saturation" else checked + 1
    assert result.stats["head_evals_per_token"] == expected_heads


def test_infinite_per_layer_thresholds_check_nothing(model):
    result = DynamicEarlyExit([math.inf, None, math.inf]).generate(model, PROMPT, 8)
    assert result.tokens == plain_loop(model, PROMPT, 8)
    assert result.stats["checked_layers"] == []
    assert result.stats["head_evals_per_token"] == 1


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
@pytest.mark.parametrize("min_exit_layer", [1, 2, 3])
def test_threshold_zero_exits_at_the_first_allowed_layer(model, measure, min_exit_layer):
    result = DynamicEarlyExit(0.0, measure=measure, min_exit_layer=min_exit_layer).generate(model, PROMPT, 16)
    assert [t["exit_layer"] for t in result.token_info] == [min_exit_layer] * 16
    assert result.stats["blocks_per_token"] == min_exit_layer
    assert result.stats["head_evals_per_token"] == 1
    assert result.stats["kv_projections_per_token"] == model.num_layers - min_exit_layer
    # Every token exits at e, so layers [0, e) are computed exactly: the output is greedy
    # decoding of the e-layer model (the propagated deeper K/V are never read).
    assert result.tokens == plain_loop(model, PROMPT, 16, exit_layer=min_exit_layer)


FREQUENT = [2, 9, 33, 50, 71, 88]  # the short head's tokens in the tests below


@pytest.fixture
def counted_model(model):
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    counts[FREQUENT] = torch.tensor([7, 3, 9, 1, 4, 2])
    model.set_token_counts(counts)
    yield model
    model.set_token_counts(None)


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
def test_short_exit_head_with_unreachable_threshold_equals_full_greedy(counted_model, measure):
    result = DynamicEarlyExit(1.5, measure=measure, exit_vocab=6).generate(counted_model, PROMPT, 12)
    assert result.tokens == plain_loop(counted_model, PROMPT, 12)
    assert result.stats["exit_layers"] == [counted_model.num_layers] * 12
    assert result.stats["head_evals_per_token"] == 1  # the last layer's full head
    assert result.stats["short_head_evals_per_token"] == (0 if measure == "saturation" else 3)


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
@pytest.mark.parametrize("min_exit_layer", [1, 3])
def test_short_exit_head_exits_with_a_frequent_token(counted_model, measure, min_exit_layer):
    model = counted_model
    result = DynamicEarlyExit(0.0, measure=measure, min_exit_layer=min_exit_layer, exit_vocab=6).generate(
        model, PROMPT, 10)
    assert result.stats["exit_layers"] == [min_exit_layer] * 10
    assert result.stats["head_evals_per_token"] == 0 and result.stats["short_head_evals_per_token"] == 1
    # greedy decoding of the e-layer model restricted to the frequent tokens
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([seq]), exit_layer=min_exit_layer).logits[0, -1]
            seq.append(FREQUENT[int(logits[FREQUENT].argmax())])
    assert result.tokens == seq[len(PROMPT):]


def test_per_layer_thresholds_and_check_every(model):
    # Layer 1 can never exit, layer 2 always can.
    result = DynamicEarlyExit([math.inf, 0.0, 0.0]).generate(model, PROMPT, 6)
    assert result.stats["exit_layers"] == [2] * 6
    # check_every=2 from layer 1 checks layers 1 and 3 only: layer 2's 0 is never looked at.
    result = DynamicEarlyExit([math.inf, 0.0, 0.0], check_every=2).generate(model, PROMPT, 6)
    assert result.stats["checked_layers"] == [3]
    assert result.stats["exit_layers"] == [3] * 6


def middle_threshold(model, measure):
    """A threshold that makes exits land on several different layers."""
    seq = PROMPT + plain_loop(model, PROMPT, 30)
    with torch.no_grad():
        h = model.embed(torch.tensor([seq]))
        confs, prev = [], h
        for layer in range(model.num_layers - 1):
            h = model.run_blocks(h, layer, layer + 1)
            if measure == "saturation":
                confs.append(saturation_confidence(h, prev))
            else:
                confs.append(logit_confidence(model.unembed(h), measure))
            prev = h
    return float(torch.cat(confs).flatten().median())


def reference_dee(model, prompt, new_tokens, exits):
    """Rebuild DEE's cache from its tokens and exit layers with an independent plain loop.

    Every fed token runs blocks [0, e) on the cache; each skipped layer j >= e gets the
    K/V of the exited hidden state, normalised by that layer's attn_norm (CALM).
    """
    cache = model.new_cache()
    fed = [prompt[-1]] + list(new_tokens[:-1])
    with torch.no_grad():
        model(torch.tensor([prompt[:-1]]), cache=cache)  # the prompt prefill: exact, all layers
        for pos, (token, e) in enumerate(zip(fed, exits), start=len(prompt) - 1):
            h = model.embed(torch.tensor([[token]]))
            cos, sin = model.rotary(pos, 1)
            for layer in range(e):
                h = model.layers[layer](h, cos, sin, cache, layer, pos)
            for j in range(e, model.num_layers):
                x = model.layers[j].attn_norm(h)
                k = model.layers[j].attn.k_proj(x).view(1, 1, -1, model.config.head_dim).transpose(1, 2)
                v = model.layers[j].attn.v_proj(x).view(1, 1, -1, model.config.head_dim).transpose(1, 2)
                cache.write(j, pos, apply_rotary(k, cos, sin), v)
    return cache


@pytest.mark.parametrize("measure", GLOBAL_MEASURES)
def test_cache_complete_and_consistent_after_dee(model, measure):
    lam = middle_threshold(model, measure)
    dee = DynamicEarlyExit(lam, measure=measure)
    cache = model.new_cache()
    n = 24
    result = dee.generate(model, PROMPT, n, cache=cache)
    exits = result.stats["exit_layers"]
    assert len(set(exits)) >= 2, f"threshold {lam} did not spread exits: {exits}"
    assert min(exits) < model.num_layers
    # Complete: every layer holds every fed position (prompt + all new tokens but the last).
    assert cache.lengths == [len(PROMPT) + n - 1] * model.num_layers
    # Consistent: exactly the K/V that propagation defines, position by position.
    ref = reference_dee(model, PROMPT, result.tokens, exits)
    length = cache.lengths[0]
    torch.testing.assert_close(cache.k[:, :, :, :length], ref.k[:, :, :, :length], **TOL)
    torch.testing.assert_close(cache.v[:, :, :, :length], ref.v[:, :, :, :length], **TOL)
    assert result.stats["kv_projections_per_token"] == sum(model.num_layers - e for e in exits) / n


def test_sampling_with_unreachable_threshold_equals_plain_sampling(model):
    sampling = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9)
    got = DynamicEarlyExit(2.0).generate(model, PROMPT, 15, sampling=sampling,
                                         generator=torch.Generator().manual_seed(7))
    want = plain_loop(model, PROMPT, 15, sampling=sampling, generator=torch.Generator().manual_seed(7))
    assert got.tokens == want


def test_eos_context_streaming_and_stats(model):
    full = plain_loop(model, PROMPT, 10)
    streamed: list[int] = []
    result = DynamicEarlyExit(2.0).generate(model, PROMPT, 10, stop_ids=(full[4],), on_tokens=streamed.extend)
    stop = full.index(full[4]) + 1
    assert result.tokens == full[:stop] == streamed
    assert result.stop_reason == "eos"
    long = DynamicEarlyExit(0.0).generate(model, [1] * 60, 50)
    assert long.num_tokens == 4 and long.stop_reason == "context"
    stats = long.summary()
    for key in ("mean_exit_layer", "blocks_per_token", "head_evals_per_token", "tokens_per_second", "exit_layers"):
        assert key in stats


def test_single_token_prompt(model):
    assert DynamicEarlyExit(2.0).generate(model, [7], 5).tokens == plain_loop(model, [7], 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(thresholds=float("nan")),
        dict(thresholds=-0.1),
        dict(thresholds=[0.5, float("nan"), 0.5]),
        dict(thresholds=0.5, measure="entropy"),
        dict(thresholds=0.5, min_exit_layer=0),
        dict(thresholds=0.5, check_every=0),
        dict(thresholds=0.5, exit_vocab=1),
        dict(thresholds=0.5, exit_vocab=2.5),
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        DynamicEarlyExit(**kwargs)


def test_wrong_number_of_thresholds_or_min_exit_refused(model):
    with pytest.raises(ConfigError, match="per-layer thresholds"):
        DynamicEarlyExit([0.5, 0.5]).generate(model, PROMPT, 3)
    with pytest.raises(ConfigError, match="min_exit_layer"):
        DynamicEarlyExit(0.5, min_exit_layer=9).generate(model, PROMPT, 3)


def test_dee_sizes_its_cache_to_the_prompt_and_the_new_tokens(monkeypatch):
    """Not to the model's whole context (131,072 positions for Llama 3.2: gigabytes of K/V)."""
    model = tiny_model()
    sizes = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda **kw: sizes.append(kw.get("max_len")) or new_cache(**kw))
    DynamicEarlyExit(2.0).generate(model, [1, 2, 3], 5)
    assert sizes == [3 + 5]

"""The autoregressive baseline: its cache is right (== uncached re-runs), its stops and prompt policy."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from layerskip.decoding import Autoregressive, DynamicEarlyExit, SamplingConfig, make_strategy, sampling_probs
from layerskip.errors import ConfigError, PromptError


@pytest.fixture(scope="module", params=[dict(), dict(num_kv_heads=2), dict(seed=1, tie_embeddings=False)],
                ids=["mha", "gqa", "untied"])
def model(request):
    return tiny_model(**request.param)


def prompt(length: int, seed: int = 3) -> list[int]:
    return torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def uncached_decode(model, ids, steps, sampling=SamplingConfig(), generator=None) -> list[int]:
    """The reference: re-run the whole sequence through the model for every new token, no cache."""
    seq = list(ids)
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0, -1]
        if sampling.greedy:
            seq.append(int(logits.argmax()))
        else:
            seq.append(int(torch.multinomial(sampling_probs(logits, sampling), 1, generator=generator)))
    return seq[len(ids):]


@pytest.mark.parametrize("length", [1, 5, 30])
def test_greedy_equals_uncached_argmax_rerun(model, length):
    ids = prompt(length)
    result = Autoregressive().generate(model, ids, 25)
    assert result.tokens == uncached_decode(model, ids, 25)
    assert result.stop_reason == "length" and result.prompt_len == length and result.strategy == "ar"
    assert len(result.token_info) == 25 and result.seconds > 0 and result.time_to_first_token > 0


def test_sampled_equals_uncached_sampling_with_the_same_generator(model):
    ids = prompt(6)
    sampling = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)
    result = Autoregressive().generate(model, ids, 25, sampling=sampling, generator=torch.Generator().manual_seed(7))
    expected = uncached_decode(model, ids, 25, sampling, torch.Generator().manual_seed(7))
    assert result.tokens == expected
    assert len(set(result.tokens)) > 3  # really sampled, not stuck


def test_eos_stops_after_emitting_it(model):
    ids = prompt(4)
    full = Autoregressive().generate(model, ids, 20).tokens
    eos = full[6]
    result = Autoregressive().generate(model, ids, 20, stop_ids=(eos,))
    assert result.tokens == full[: full.index(eos) + 1] and result.stop_reason == "eos"


def test_streaming_reports_every_token_in_order(model):
    seen: list[list[int]] = []
    result = Autoregressive().generate(model, prompt(4), 12, on_tokens=seen.append)
    assert sum(seen, []) == result.tokens and all(len(chunk) == 1 for chunk in seen)


def test_prompt_policy():
    model = tiny_model()  # context 64
    with pytest.raises(PromptError, match="empty"):
        Autoregressive().generate(model, [], 5)
    with pytest.raises(PromptError, match="no room"):
        Autoregressive().generate(model, prompt(64), 5)
    with pytest.raises(ConfigError):
        Autoregressive().generate(model, prompt(4), 0)
    for bad in (97, -1):  # the vocabulary holds ids 0..96: one outside it names itself
        with pytest.raises(PromptError, match=f"token id {bad} is outside the model's vocabulary of 97"):
            Autoregressive().generate(model, [3, bad, 4], 5)
    result = Autoregressive().generate(model, prompt(60), 10)  # room for 4 only
    assert len(result.tokens) == 4 and result.stop_reason == "context"
    assert result.tokens == uncached_decode(model, prompt(60), 4)
    exact = Autoregressive().generate(model, prompt(60), 4)
    assert exact.tokens == result.tokens and exact.stop_reason == "length"


def test_training_mode_is_refused():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="eval mode"):
        Autoregressive().generate(model, [1, 2], 3)


def test_make_strategy_modes():
    assert make_strategy("ar").name == "ar"
    assert make_strategy("ssd", draft_layer=1, k=2).name == "ssd"
    with pytest.raises(ConfigError):
        make_strategy("ar", k=3)
    assert isinstance(make_strategy("dee", thresholds=0.9), DynamicEarlyExit)

"""Self-speculative decoding: greedy SSD is greedy AR, token for token; control flow on scripted stubs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from layerskip.cache import KVCache
from layerskip.decoding import Autoregressive, DynamicEarlyExit, SelfSpeculative, make_strategy
from layerskip.errors import ConfigError
from layerskip.fastpath import FastDecoder, decoding

NEW_TOKENS = 30


def prompts(count: int, vocab: int = 97, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in (1, 7, 19)[:count]]


# Tied models accept most drafts (long accepted runs, bonus tokens); untied ones reject most
# (corrections); GQA is in between. Together they reach every acceptance length.
MODELS = {"tied": dict(seed=0), "untied": dict(seed=1, tie_embeddings=False), "gqa": dict(seed=0, num_kv_heads=2)}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_ar(request):
    model = tiny_model(**MODELS[request.param])
    ar = {tuple(p): Autoregressive().generate(model, p, NEW_TOKENS).tokens for p in prompts(3)}
    return model, ar


@pytest.mark.parametrize("draft_layer", [1, 2, 3])
def test_greedy_ssd_equals_greedy_ar_for_every_draft_depth_and_length(model_and_ar, draft_layer):
    model, ar = model_and_ar
    for k in range(1, 9):
        for prompt, expected in ar.items():
            result = SelfSpeculative(draft_layer, k).generate(model, list(prompt), NEW_TOKENS)
            assert result.tokens == expected, (draft_layer, k, len(prompt))
            assert result.stop_reason == "length"
            stats = result.stats
            assert sum(stats["accepted_length_histogram"]) == stats["rounds"]
            assert sum(a * c for a, c in enumerate(stats["accepted_length_histogram"])) == stats["accepted_tokens"]
            assert sum(info["accepted"] for info in result.token_info) == stats["accepted_tokens"]
            assert stats["rounds"] + stats["accepted_tokens"] == NEW_TOKENS  # one full-model token per round


@pytest.mark.parametrize("draft_layer", [1, 3])
def test_greedy_ssd_without_bonus_or_with_backoff_equals_greedy_ar(model_and_ar, draft_layer):
    model, ar = model_and_ar
    for k in (1, 3, 8):
        for options in (dict(bonus=False), dict(max_backoff=4), dict(max_backoff=8, adaptive_threshold=0.5)):
            for prompt, expected in ar.items():
                result = SelfSpeculative(draft_layer, k, **options).generate(model, list(prompt), NEW_TOKENS)
                assert result.tokens == expected, (draft_layer, k, options, len(prompt))


@pytest.mark.parametrize("draft_layer", [1, 2, 3])
def test_greedy_ssd_with_a_short_draft_head_equals_greedy_ar(model_and_ar, draft_layer):
    model, ar = model_and_ar
    model.set_token_counts(torch.arange(model.config.vocab_size).flip(0))  # favour low ids, not the id order
    try:
        for k in (1, 2, 4, 8):
            for vocab in (1, 10, 40, model.config.vocab_size):
                for prompt, expected in ar.items():
                    result = SelfSpeculative(draft_layer, k, draft_vocab=vocab).generate(model, list(prompt), NEW_TOKENS)
                    assert result.tokens == expected, (draft_layer, k, vocab, len(prompt))
                    assert result.stats["draft_vocab"] == vocab
    finally:
        model.set_token_counts(None)


def test_short_draft_head_drafts_only_frequent_tokens():
    model, prompt = tiny_model(seed=0), prompts(2)[1]
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    frequent = [3, 17, 42, 60, 91]
    counts[frequent] = torch.tensor([5, 9, 2, 7, 1])
    model.set_token_counts(counts)
    drafted: list[int] = []
    strategy = SelfSpeculative(2, 4, draft_vocab=5)
    original = strategy.propose

    def spy(logits, sampling, generator):
        token, q = original(logits, sampling, generator)
        drafted.append(int(strategy_ids[token]))
        return token, q

    strategy_ids = model.frequent_ids(5)
    assert strategy_ids.tolist() == frequent
    strategy.propose = spy
    result = strategy.generate(model, prompt, NEW_TOKENS)
    assert result.tokens == Autoregressive().generate(model, prompt, NEW_TOKENS).tokens
    assert drafted and set(drafted) <= set(frequent)
    h = torch.randn(1, 2, model.config.d_model)
    with decoding():
        logits, ids = FastDecoder.of(model).unembed_short(h, 5)
        full = model.unembed(h)
    assert logits.shape == (1, 2, 5) and ids.tolist() == frequent
    torch.testing.assert_close(logits, full[..., frequent], rtol=1e-5, atol=1e-5)


def test_the_sweep_reaches_accept_all_and_reject_first():
    """Guard against a vacuous sweep: the models above really do accept and reject drafts."""
    seen_all, seen_none = set(), set()
    for name, kwargs in MODELS.items():
        model = tiny_model(**kwargs)
        stats = SelfSpeculative(2, 4).generate(model, prompts(2)[1], NEW_TOKENS).stats
        hist = stats["accepted_length_histogram"]
        if hist[4]:
            seen_all.add(name)
        if hist[0]:
            seen_none.add(name)
    assert seen_all and seen_none


def test_eos_inside_a_draft_stops_where_ar_stops():
    cases = 0
    for kwargs in MODELS.values():
        model = tiny_model(**kwargs)
        for prompt in prompts(2):
            reference = Autoregressive().generate(model, prompt, NEW_TOKENS).tokens
            for cut in (2, 5, 11):  # EOS = the token greedy AR emits at index `cut` (its first occurrence)
                eos = reference[cut]
                expected = reference[: reference.index(eos) + 1]
                assert Autoregressive().generate(model, prompt, NEW_TOKENS, stop_ids=(eos,)).tokens == expected
                for draft_layer in (1, 3):
                    for k in (2, 5, 8):
                        result = SelfSpeculative(draft_layer, k).generate(model, prompt, NEW_TOKENS, stop_ids=(eos,))
                        assert result.tokens == expected
                        assert result.stop_reason == "eos"
                        cases += 1
    assert cases == 3 * 2 * 3 * 2 * 3


def test_any_of_several_stop_tokens_ends_every_strategy():
    model = tiny_model(**next(iter(MODELS.values())))
    prompt = prompts(1)[0]
    reference = Autoregressive().generate(model, prompt, NEW_TOKENS).tokens
    stops = (reference[9], reference[4], 10**6)  # listed out of order, and one the model never emits
    first = min(reference.index(reference[9]), reference.index(reference[4]))
    for strategy in (Autoregressive(), SelfSpeculative(2, 4), DynamicEarlyExit(2.0)):
        result = strategy.generate(model, prompt, NEW_TOKENS, stop_ids=stops)
        assert result.tokens == reference[: first + 1] and result.stop_reason == "eos", strategy.name
    with pytest.raises(ConfigError, match="collection of token ids"):
        Autoregressive().generate(model, prompt, NEW_TOKENS, stop_ids=reference[4])


@pytest.mark.parametrize("max_new", [1, 2, 3, 6, 13])
def test_length_limit_inside_a_draft(max_new):
    model = tiny_model(**MODELS["tied"])  # long accepted drafts, so the limit falls inside one
    prompt = prompts(2)[1]
    expected = Autoregressive().generate(model, prompt, max_new).tokens
    assert len(expected) == max_new
    for k in (1, 4, 8):
        result = SelfSpeculative(2, k).generate(model, prompt, max_new)
        assert result.tokens == expected and result.stop_reason == "length"
        assert len(result.token_info) == max_new


def test_context_limit_stops_with_reason_context():
    model = tiny_model(**MODELS["untied"])  # max_seq_len 64
    prompt = list(range(1, 61))
    ar = Autoregressive().generate(model, prompt, 50)
    ssd = SelfSpeculative(2, 4).generate(model, prompt, 50)
    assert len(ar.tokens) == 4 and ar.stop_reason == "context"
    assert ssd.tokens == ar.tokens and ssd.stop_reason == "context"


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.9])
def test_adaptive_draft_length_keeps_greedy_output(threshold):
    for kwargs in MODELS.values():
        model = tiny_model(**kwargs)
        for prompt in prompts(2):
            expected = Autoregressive().generate(model, prompt, NEW_TOKENS).tokens
            result = SelfSpeculative(2, 8, adaptive_threshold=threshold).generate(model, prompt, NEW_TOKENS)
            assert result.tokens == expected


def test_adaptive_threshold_drafts_less_when_unsure():
    model = tiny_model(**MODELS["untied"])
    prompt = prompts(2)[1]
    fixed = SelfSpeculative(2, 8).generate(model, prompt, NEW_TOKENS).stats
    adaptive = SelfSpeculative(2, 8, adaptive_threshold=0.9).generate(model, prompt, NEW_TOKENS).stats
    assert adaptive["drafted_tokens"] < fixed["drafted_tokens"]


def test_bad_settings_are_config_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="draft_layer must be in 1..3"):
        SelfSpeculative(4, 2).generate(model, [1, 2], 5)
    for bad in (dict(draft_layer=0), dict(draft_layer=2, k=0), dict(draft_layer=2, adaptive_threshold=1.5),
                dict(draft_layer=2, max_backoff=-1)):
        with pytest.raises(ConfigError):
            SelfSpeculative(**bad)
    with pytest.raises(ConfigError, match="draft_vocab"):
        SelfSpeculative(2, 4, draft_vocab=0)
    with pytest.raises(ConfigError, match="unknown generation mode"):
        make_strategy("beam")
    with pytest.raises(ConfigError, match="bad options"):
        make_strategy("ssd", draft_layer=2, kk=3)
    assert isinstance(make_strategy("ssd", draft_layer=2, k=3), SelfSpeculative)
    assert isinstance(make_strategy("ar"), Autoregressive)


# ---------------------------------------------------------------- scripted stub models


class StubEmbedding:
    weight = torch.zeros(1)  # strategies read the device from it

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:  # (1, T) -> (1, T, 3): (token, position, depth)
        h = torch.zeros(*idx.shape, 3)
        h[..., 0] = idx
        return h


class ScriptedModel:
    """A stand-in model, and its own fast path, whose logits the test writes, indexed by position.

    The hidden state of a position is (token, position, blocks run so far). After E blocks the
    draft's logits put `draft_scale[p]` on `draft_next[p]`; after all L blocks the full model
    predicts `full_next[p]`. Keys hold the token ids, so the test can read back what the cache
    holds; every block call is recorded.
    """

    def __init__(self, full_next, draft_next, draft_layer, *, num_layers=4, vocab=16, draft_scale=None):
        self.full_next, self.draft_next, self.draft_layer = full_next, draft_next, draft_layer
        self.draft_scale = draft_scale or {}
        self.num_layers, self.vocab, self.training = num_layers, vocab, False
        self.config = SimpleNamespace(max_seq_len=64, num_layers=num_layers, vocab_size=vocab)
        self.embed_tokens = StubEmbedding()
        self.model = self  # as a FastDecoder: the model it runs
        self.calls: list[tuple[int, int, int, int]] = []  # (start, end, pos, T)
        self.cache_views: list[list[list[int]]] = []  # per call, per layer: cached tokens of [0, pos)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(idx)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.num_layers, batch_size, 1, max_len or 64, 1)

    def run_blocks(self, h, start, end, *, cache, pos):
        t = h.shape[1]
        assert torch.all(h[..., 2] == start), "hidden states enter a block range they have not reached"
        self.calls.append((start, end, pos, t))
        self.cache_views.append([cache.k[layer, 0, 0, :pos, 0].long().tolist() for layer in range(start, end)])
        for layer in range(start, end):
            assert cache.lengths[layer] == pos, "the cache must hold exactly the positions before pos"
            cache.write(layer, pos, h[..., 0].view(1, 1, t, 1), h[..., 0].view(1, 1, t, 1))
        h = h.clone()
        h[..., 1] = torch.arange(pos, pos + t)
        h[..., 2] = end
        return h

    def step(self, tokens, pos, cache, end=None, vocab=None):  # FastDecoder.step's contract, full head only
        assert vocab is None
        h = self.run_blocks(self.embed_tokens(tokens), 0, self.num_layers if end is None else end, cache=cache,
                            pos=pos)
        return h, self.unembed(h).view(-1), None

    def unembed(self, h):  # (1, T, 3) -> (1, T, V)
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        for j in range(h.shape[1]):
            p, depth = int(h[0, j, 1]), int(h[0, j, 2])
            if depth == self.num_layers:
                logits[0, j, self.full_next[p]] = 10.0
            else:
                assert depth == self.draft_layer
                logits[0, j, self.draft_next[p]] = self.draft_scale.get(p, 10.0)
        return logits


FULL = [(3 * p + 1) % 13 for p in range(64)]  # the full model's next token after position p


def wrong_at(positions):
    return [(t + 1) % 13 if p in positions else t for p, t in enumerate(FULL)]


def run_stub(draft_next, *, k=3, max_new=12, eos=None, draft_scale=None, threshold=None, bonus=True, backoff=0):
    model = ScriptedModel(FULL, draft_next, 2, draft_scale=draft_scale)
    prompt = [5, 6]
    strategy = SelfSpeculative(2, k, adaptive_threshold=threshold, bonus=bonus, max_backoff=backoff)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FastDecoder, "of", staticmethod(lambda stub: stub))
        result = strategy.generate(model, prompt, max_new, stop_ids=() if eos is None else (eos,))
    sequence = prompt + result.tokens
    # Where a round starts (its first draft call, and its verify call) the cache holds exactly
    # the committed tokens: rejected drafts never survive a round.
    for i, ((start, _, pos, _), views) in enumerate(zip(model.calls, model.cache_views)):
        if start == 2 or (i > 0 and model.calls[i - 1][0] == 2) or i == 1:
            assert all(view == sequence[:pos] for view in views), (i, model.calls[i])
    return model, result


def expected_tokens(max_new, first=1):
    return FULL[first : first + max_new]


def accepted_flags(result):
    return [info["accepted"] for info in result.token_info]


def test_stub_accept_all():
    model, result = run_stub(list(FULL))
    assert result.tokens == expected_tokens(12)
    assert result.stats["accepted_length_histogram"] == [0, 0, 0, 3]
    assert (result.stats["rounds"], result.stats["drafted_tokens"], result.stats["accepted_tokens"]) == (3, 9, 9)
    assert accepted_flags(result) == [True, True, True, False] * 3
    # Round 1: prefill of position 0, three drafts and the tail through [0, E), then ONE verify.
    assert model.calls[:6] == [(0, 4, 0, 1), (0, 2, 1, 1), (0, 2, 2, 1), (0, 2, 3, 1), (0, 2, 4, 1), (2, 4, 1, 4)]
    draft_positions = [pos for start, end, pos, t in model.calls if (start, end) == (0, 2)]
    assert len(draft_positions) == len(set(draft_positions)) == 12  # [0, E) never recomputed
    assert [c for c in model.calls if c[0] == 2] == [(2, 4, 1, 4), (2, 4, 5, 4), (2, 4, 9, 4)]


def test_stub_accept_all_without_bonus_tokens():
    model, result = run_stub(list(FULL), bonus=False)
    assert result.tokens == expected_tokens(12)
    # Rounds of 3 accepted drafts and no tail (so no bonus token); near the limit a round drafts 2,
    # and the last token comes from a round with no room for drafts: a plain full step.
    assert [c for c in model.calls if c[0] == 2] == [(2, 4, 1, 3), (2, 4, 4, 3), (2, 4, 7, 3), (2, 4, 10, 2), (2, 4, 12, 1)]
    assert accepted_flags(result) == [True] * 11 + [False]
    assert result.stats["accepted_length_histogram"] == [1, 0, 1, 3]


def test_stub_reject_first():
    model, result = run_stub(wrong_at(range(64)))
    assert result.tokens == expected_tokens(12)
    assert result.stats["accepted_length_histogram"] == [12, 0, 0, 0]
    # 9 rounds draft 3 each; then the length limit leaves room for 2, 1 and 0 drafts.
    assert (result.stats["rounds"], result.stats["drafted_tokens"], result.stats["accepted_tokens"]) == (12, 30, 0)
    assert accepted_flags(result) == [False] * 12
    verify = [c for c in model.calls if c[0] == 2]
    assert verify == [(2, 4, p, 4) for p in range(1, 10)] + [(2, 4, 10, 3), (2, 4, 11, 2), (2, 4, 12, 1)]


def test_stub_reject_first_with_backoff_drafts_ever_more_rarely():
    model, result = run_stub(wrong_at(range(64)), backoff=4)
    assert result.tokens == expected_tokens(12)
    verify = [(pos, t) for start, _, pos, t in model.calls if start == 2]
    # Drafting rounds (T = 4, or 2 at the limit) fail, then 1, 2, 4, 4 plain steps (T = 1).
    assert verify == [(1, 4), (2, 1), (3, 4), (4, 1), (5, 1), (6, 4)] + [(p, 1) for p in range(7, 11)] + [(11, 2), (12, 1)]
    assert result.stats["plain_steps"] == 8 and result.stats["drafted_tokens"] == 10


def test_stub_backoff_resets_after_an_accepted_draft():
    model, result = run_stub(wrong_at({1, 3}), backoff=8)
    assert result.tokens == expected_tokens(12)
    verify = [(pos, t) for start, _, pos, t in model.calls if start == 2]
    # Round at 1 fails -> one plain step at 2; the round at 3 fails -> two plain steps at 4, 5; the
    # round at 6 accepts all -> no more back-off.
    assert verify[:6] == [(1, 4), (2, 1), (3, 4), (4, 1), (5, 1), (6, 4)]
    assert all(t > 1 for _, t in verify[6:-1])


def test_stub_mixed():
    model, result = run_stub(wrong_at({3, 4, 9}))
    assert result.tokens == expected_tokens(12)
    # rounds from positions 1, 4, 5, 9, 10 accept 2, 0, 3, 0, 2 (the last drafts 2: the limit)
    assert result.stats["accepted_length_histogram"] == [2, 0, 2, 1]
    assert (result.stats["rounds"], result.stats["drafted_tokens"], result.stats["accepted_tokens"]) == (5, 14, 7)
    assert accepted_flags(result) == [True, True, False, False, True, True, True, False, False, True, True, False]
    assert [c for c in model.calls if c[0] == 2] == [(2, 4, 1, 4), (2, 4, 4, 4), (2, 4, 5, 4), (2, 4, 9, 4), (2, 4, 10, 3)]


def test_stub_accepted_eos_inside_a_draft_stops_without_a_tail():
    eos = FULL[3]  # the token after position 3: the second draft of round 1
    model, result = run_stub(list(FULL), k=4, eos=eos)
    assert result.tokens == [FULL[1], FULL[2], FULL[3]] and result.stop_reason == "eos"
    assert model.calls == [(0, 4, 0, 1), (0, 2, 1, 1), (0, 2, 2, 1), (0, 2, 3, 1), (2, 4, 1, 3)]


def test_stub_rejected_eos_draft_does_not_stop():
    draft = list(FULL)
    draft[2] = 14  # the draft proposes 14 (our EOS) after position 2; the full model never does
    model, result = run_stub(draft, k=4, eos=14)
    assert result.tokens == expected_tokens(12) and result.stop_reason == "length"
    assert model.calls[1:5] == [(0, 2, 1, 1), (0, 2, 2, 1), (2, 4, 1, 2), (0, 2, 3, 1)]


def test_stub_eos_from_the_verifier_stops():
    eos = FULL[3]
    _, result = run_stub(wrong_at({3}), k=4, eos=eos)  # the draft misses it; the correction is EOS
    assert result.tokens == [FULL[1], FULL[2], FULL[3]] and result.stop_reason == "eos"
    assert accepted_flags(result) == [True, True, False]


def test_stub_adaptive_stop_drops_the_unsure_draft_and_reuses_its_input():
    # The draft is unsure after position 3: round 1 drafts from positions 1 and 2 only, and the
    # unsure step's exit hidden state (position 3) is verified without a separate tail call.
    model, result = run_stub(list(FULL), k=4, draft_scale={3: 0.0}, threshold=0.5)
    assert result.tokens == expected_tokens(12)
    assert model.calls[1:5] == [(0, 2, 1, 1), (0, 2, 2, 1), (0, 2, 3, 1), (2, 4, 1, 3)]
    assert accepted_flags(result)[:3] == [True, True, False]


def test_batched_and_row_by_row_verification_agree():
    """Both ways of unembedding verified rows (all at once, or lazily up to the first rejection)."""
    for kwargs in MODELS.values():
        model = tiny_model(**kwargs)
        prompt = prompts(2)[1]
        expected = Autoregressive().generate(model, prompt, NEW_TOKENS).tokens
        for k in (2, 5):
            strategy = SelfSpeculative(2, k)
            strategy.lazy_head = False
            batched = strategy.generate(model, prompt, NEW_TOKENS)
            assert batched.tokens == expected
            assert batched.stats == SelfSpeculative(2, k).generate(model, prompt, NEW_TOKENS).stats

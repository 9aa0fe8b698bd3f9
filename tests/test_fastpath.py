"""The decoding fast path: the model's own functions, following weight changes, taken only when asked for."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import random_tokens as tokens
from conftest import tiny_model
from torch.testing import assert_close

from layerskip import fastpath
from layerskip.fastblock import PLAIN_ATTENTION_MAX_QUERIES, FastBlock, rotate_half_rows
from layerskip.fastpath import DerivedWeights, FastDecoder, decoding

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[dict(), dict(num_kv_heads=2), dict(tie_embeddings=False)], ids=["mha", "gqa", "untied"])
def model(request):
    return tiny_model(**request.param)


@pytest.mark.parametrize("prefill_len", [5, PLAIN_ATTENTION_MAX_QUERIES + 4])
def test_fast_blocks_equal_the_plain_blocks_and_follow_weight_changes(model, prefill_len):
    """FastBlocks, with plain attention for few queries and SDPA for many: the same numbers as the plain blocks."""
    idx = tokens(1, prefill_len + 14)
    fast = FastDecoder.of(model)

    def fast_logits(part: torch.Tensor, cache=None, pos: int = 0) -> torch.Tensor:
        return fast.unembed(fast.run_blocks(model.embed(part), 0, model.num_layers, cache=cache, pos=pos))

    with torch.no_grad():
        full = model(idx).logits  # the plain blocks
    with decoding():
        cache = model.new_cache()
        prefill = fast_logits(idx[:, :prefill_len], cache, 0)
        chunk = fast_logits(idx[:, prefill_len : prefill_len + 7], cache, prefill_len)
        rest = [fast_logits(idx[:, t : t + 1], cache, t) for t in range(prefill_len + 7, idx.shape[1])]
        uncached = fast_logits(idx)
        assert all(fast.block(layer) is fast.block(layer) for layer in range(model.num_layers))  # built once
    assert_close(torch.cat([prefill, chunk, *rest], dim=1), full, **TOL)
    assert_close(uncached, full, **TOL)
    with torch.no_grad():  # a weight changed in place: the copies must follow
        model.layers[0].attn.k_proj.weight.mul_(0.5)
        model.layers[0].mlp.up_proj.weight.mul_(2.0)
        changed = model(idx).logits
    with decoding():
        assert_close(fast_logits(idx), changed, **TOL)
    assert not torch.allclose(changed, full, atol=1e-3)


def test_fast_head_matches_the_lm_head_and_follows_weight_changes():
    """unembed's fast path (a cached transposed head for a few rows on CPU) is the same maths."""
    model = tiny_model(tie_embeddings=False)
    fast = FastDecoder.of(model)
    h = torch.randn(1, 5, model.config.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.lm_head(model.norm(h))
    with decoding():
        assert_close(fast.unembed(h), reference, **TOL)
        many = h[:, :1].expand(3, 8, -1)  # too many rows for the copy: the head itself
        assert_close(fast.unembed(many), reference[:, :1].expand(3, 8, -1), **TOL)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an in-place update (an optimizer step) must not leave it stale
    with decoding():
        assert_close(fast.unembed(h), -reference, **TOL)


def test_fast_short_head_matches_the_plain_one_and_follows_weights_and_counts():
    model = tiny_model(seed=0)
    fast = FastDecoder.of(model)
    h = torch.randn(2, 3, model.config.d_model, generator=torch.Generator().manual_seed(1))

    def both(size: int):
        with torch.no_grad():
            plain = model.unembed_short(h, size)
        with decoding():
            return plain, fast.unembed_short(h, size)

    (plain, plain_ids), (got, ids) = both(6)
    assert torch.equal(ids, plain_ids) and ids.tolist() == list(range(6))
    assert_close(got, plain, **TOL)
    assert_close(got, model.unembed(h).detach()[..., ids], **TOL)
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    counts[[4, 40, 80]] = torch.tensor([3, 2, 1])
    model.set_token_counts(counts)  # other tokens: the cached short head must not be reused
    (plain, plain_ids), (got, ids) = both(3)
    assert ids.tolist() == plain_ids.tolist() == [4, 40, 80]
    assert_close(got, plain, **TOL)
    with torch.no_grad():
        model.norm.weight.mul_(2.0)
    (plain, _), (got, _) = both(3)
    assert_close(got, plain, **TOL)
    (plain, _), (got, ids) = both(model.config.vocab_size)  # the whole vocabulary: the full head
    assert ids.tolist() == list(range(model.config.vocab_size))
    assert_close(got, plain, **TOL)


def test_the_model_takes_the_plain_path_whatever_the_mode():
    """model(idx), run_blocks and the heads mean the same under inference mode, bit for bit, and build no copy."""
    model = tiny_model(seed=3)
    idx = tokens(1, 6)

    def outputs() -> list[torch.Tensor]:
        hidden = model.run_blocks(model.embed(idx), 0, model.num_layers)
        last = hidden[:, -1:]  # one row: what decoding unembeds
        return [model(idx).logits, model(idx[:, -1:]).logits, hidden, model.unembed(last),
                model.unembed_short(last, 5)[0]]

    with torch.no_grad():
        expected = outputs()
    for mode in (torch.inference_mode, decoding):
        with mode():
            got = outputs()
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert model not in fastpath._DECODERS  # no decoder, hence no decoding copy, was made


def test_a_model_owns_its_fast_decoder_and_is_not_kept_alive_by_it():
    model = tiny_model()
    fast = FastDecoder.of(model)
    assert FastDecoder.of(model) is fast and fast.model is model
    with decoding():
        fast.unembed(torch.zeros(1, 1, model.config.d_model))
    alive = weakref.ref(model)
    del model, fast
    gc.collect()
    assert alive() is None


def test_fast_block_is_the_block_forward_without_dropout():
    model = tiny_model(seed=4, num_kv_heads=2)
    block, x = model.layers[1], torch.randn(2, 3, model.config.d_model, generator=torch.Generator().manual_seed(2))
    cos, sin = model.rotary(0, 3)
    with torch.no_grad():
        assert_close(FastBlock.of(block)(x, cos, sin, None, 1, 0), block(x, cos, sin), **TOL)


def test_rotate_half_rows_project_to_the_rotated_projection():
    torch.manual_seed(0)
    weight, x = torch.randn(3 * 8, 5), torch.randn(2, 5)
    rotated = (x @ weight.t()).view(2, 3, 8)
    expected = torch.cat((-rotated[..., 4:], rotated[..., :4]), dim=-1)
    assert_close((x @ rotate_half_rows(weight, 8).t()).view(2, 3, 8), expected)


def test_derived_weights_follow_their_weights_and_are_checked_once_per_decoding_scope():
    weight = torch.nn.Parameter(torch.ones(3))
    derived, checks = DerivedWeights(), []

    def sources():
        checks.append(1)
        return (weight,)

    def doubled():
        return weight.detach() * 2

    assert_close(derived.get("w", sources, doubled), torch.full((3,), 2.0))
    with torch.no_grad():
        weight.mul_(3)  # an in-place change: the copy must follow
    assert_close(derived.get("w", sources, doubled), torch.full((3,), 6.0))
    checks.clear()
    with decoding():
        for _ in range(5):
            derived.get("w", sources, doubled)
    assert len(checks) == 1  # checked at first use in the scope, then trusted
    with torch.no_grad():
        weight.mul_(2)
    with decoding():
        assert_close(derived.get("w", sources, doubled), torch.full((3,), 12.0))  # a new scope checks again
    with torch.inference_mode():
        made_in_inference = torch.ones(3)
    assert derived.get("x", lambda: (made_in_inference,), doubled) is None  # no version counter: never cached

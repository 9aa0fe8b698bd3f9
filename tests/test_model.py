"""Model equivalences on tiny fp32 models: whole tensors, fixed seeds, no retries."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens as tokens
from conftest import tiny_model
from torch.testing import assert_close

from layerskip.cache import KVCache
from layerskip.errors import PromptError

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[dict(), dict(num_kv_heads=2), dict(tie_embeddings=False)], ids=["mha", "gqa", "untied"])
def model(request):
    return tiny_model(**request.param)


@torch.no_grad()
def test_cached_incremental_equals_uncached_forward_at_every_position(model):
    idx = tokens(2, 20)
    full = model(idx).logits  # (B, T, V)
    cache = model.new_cache(batch_size=2)
    step_logits = [model(idx[:, t : t + 1], cache=cache, pos=t).logits for t in range(idx.shape[1])]
    assert_close(torch.cat(step_logits, dim=1), full, **TOL)
    assert cache.lengths == [20] * model.num_layers


@torch.no_grad()
def test_prefill_then_decode_equals_uncached(model):
    idx = tokens(1, 24)
    full = model(idx).logits
    cache = model.new_cache()
    prefill = model(idx[:, :10], cache=cache, pos=0).logits
    chunk = model(idx[:, 10:17], cache=cache, pos=10).logits  # several queries over a cached prefix
    rest = [model(idx[:, t : t + 1], cache=cache, pos=t).logits for t in range(17, 24)]
    assert_close(torch.cat([prefill, chunk, *rest], dim=1), full, **TOL)


@torch.no_grad()
def test_exit_after_last_block_is_the_full_forward(model):
    idx = tokens(2, 16)
    full = model(idx)
    exited = model(idx, exit_layer=model.num_layers)
    assert torch.equal(exited.logits, full.logits)
    assert torch.equal(model.unembed(full.hidden), full.logits)


@torch.no_grad()
def test_exit_hidden_states_equal_separate_shallow_runs(model):
    idx = tokens(2, 12)
    out = model(idx, exits=range(1, model.num_layers + 1))
    for k in range(1, model.num_layers + 1):
        shallow = model(idx, exit_layer=k)
        assert torch.equal(out.exit_hidden[k], shallow.hidden)
        assert torch.equal(model.unembed(out.exit_hidden[k]), shallow.logits)
    assert torch.equal(out.exit_hidden[model.num_layers], out.hidden)


@torch.no_grad()
def test_shallow_exits_differ_from_the_full_model(model):
    idx = tokens(1, 12)
    assert not torch.allclose(model(idx, exit_layer=1).logits, model(idx).logits)


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 2, 3])
def test_blocks_in_two_ranges_equal_one_range(model, split):
    idx = tokens(2, 14)
    h = model.embed(idx)
    whole = model.run_blocks(h, 0, model.num_layers)
    parts = model.run_blocks(model.run_blocks(h, 0, split), split, model.num_layers)
    assert torch.equal(parts, whole)
    # The same through a shared cache: draft layers [0, split) then the rest, as SSD does.
    cache = model.new_cache(batch_size=2)
    first = model.run_blocks(h, 0, split, cache=cache, pos=0)
    assert cache.lengths == [14] * split + [0] * (model.num_layers - split)
    cached = model.run_blocks(first, split, model.num_layers, cache=cache, pos=0)
    assert_close(cached, whole, **TOL)


@torch.no_grad()
def test_truncating_the_cache_and_rerunning_gives_the_same_logits(model):
    idx = tokens(1, 20)
    cache = model.new_cache()
    model(idx[:, :12], cache=cache, pos=0)
    reference = model(idx[:, 12:20], cache=cache, pos=12).logits
    # Roll back a rejected "draft" of other tokens, then re-run the real ones.
    cache.truncate(12)
    model(tokens(1, 5, seed=9), cache=cache, pos=12)
    cache.truncate(12)
    rerun = model(idx[:, 12:20], cache=cache, pos=12).logits
    assert_close(rerun, reference, **TOL)
    assert_close(rerun, model(idx).logits[:, 12:20], **TOL)


@torch.no_grad()
def test_layer_keep_all_true_is_a_no_op_and_all_false_skips_every_block(model):
    idx = tokens(3, 10)
    L = model.num_layers
    full = model(idx).logits
    assert torch.equal(model(idx, layer_keep=torch.ones(L, 3, dtype=torch.bool)).logits, full)
    skipped = model(idx, layer_keep=torch.zeros(L, 3, dtype=torch.bool))
    assert torch.equal(skipped.hidden, model.embed(idx))


@torch.no_grad()
def test_layer_keep_skips_per_sample(model):
    idx = tokens(2, 10)
    keep = torch.ones(model.num_layers, 2, dtype=torch.bool)
    keep[1, 0] = False  # sample 0 skips block 1; sample 1 runs everything
    out = model(idx, layer_keep=keep).logits
    h0 = model.embed(idx[:1])
    h0 = model.run_blocks(h0, 0, 1)
    h0 = model.run_blocks(h0, 2, model.num_layers)
    assert_close(out[0], model.unembed(h0)[0], **TOL)
    assert_close(out[1], model(idx[1:]).logits[0], **TOL)


def test_positions_beyond_the_context_are_refused(model):
    with pytest.raises(PromptError, match="context of 64"):
        model(tokens(1, 65))
    cache = model.new_cache()
    with pytest.raises(PromptError, match="context"):
        model(tokens(1, 2), cache=cache, pos=63)


def test_bad_exit_layers_are_refused(model):
    with pytest.raises(ValueError, match="exit_layer"):
        model(tokens(1, 4), exit_layer=0)
    with pytest.raises(ValueError, match="exits"):
        model(tokens(1, 4), exit_layer=2, exits=[3])


def test_cache_refuses_gaps():
    model = tiny_model()
    cache = model.new_cache()
    with pytest.raises(ValueError, match="without gaps"):
        model(tokens(1, 2), cache=cache, pos=3)


def test_writing_several_layers_at_once_equals_layer_by_layer_and_refuses_gaps():
    one, many = KVCache(4, 1, 2, 8, 3), KVCache(4, 1, 2, 8, 3)
    k, v = torch.randn(4, 1, 2, 1, 3), torch.randn(4, 1, 2, 1, 3)
    first = torch.randn(2, 4, 1, 2, 1, 3)  # k|v of position 0, every layer
    for cache in (one, many):
        for layer in range(4):
            cache.write(layer, 0, first[0, layer], first[1, layer])
    for layer in range(1, 4):
        one.write(layer, 1, k[layer], v[layer])
    many.write_layers(1, 1, k[1:], v[1:])
    assert many.lengths == one.lengths == [1, 2, 2, 2]
    assert torch.equal(many.k, one.k) and torch.equal(many.v, one.v)
    with pytest.raises(ValueError, match="without gaps"):
        many.write_layers(0, 2, k, v)  # layer 0 holds one position only
    with pytest.raises(ValueError, match="at most 8"):
        many.write_layers(1, 2, torch.randn(3, 1, 2, 7, 3), torch.randn(3, 1, 2, 7, 3))


def test_tied_embeddings_share_one_tensor():
    m = tiny_model()
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    u = tiny_model(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.embed_tokens.weight.data_ptr()

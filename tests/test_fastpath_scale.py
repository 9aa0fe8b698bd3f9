"""The fast path at scale: its layout per size and dtype, no copies above the limit, half precision,
the verifier's batched head, the short head without token counts, and the decoding threads rule."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens as tokens
from conftest import tiny_model
from torch.testing import assert_close

from layerskip import fastpath, kernels
from layerskip.decoding import Autoregressive, DynamicEarlyExit, SelfSpeculative
from layerskip.decoding import ssd as ssd_module
from layerskip.device import THREADS_MIN_PARAMETERS, available_cores, decoding_threads, idle_cores
from layerskip.fastpath import FOLDED, IN_PLACE, FastDecoder, decoding, layout_of, weight_bytes

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPES = {"mha": dict(), "gqa": dict(num_kv_heads=2), "untied": dict(tie_embeddings=False)}
CPU = torch.device("cpu")


@pytest.fixture
def no_copies(monkeypatch):
    """Every model is 'large': the fast path must decode from the model's own weights."""
    monkeypatch.setattr(fastpath, "COPY_LIMIT_BYTES", 0)


def chunked_logits(model, run_blocks, unembed, idx: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """Logits of idx decoded as a prefill, then one token at a time with a cache: (1, T, V) in fp32."""
    cache = model.new_cache()
    parts = [unembed(run_blocks(model.embed(idx[:, :prefill]), 0, model.num_layers, cache=cache, pos=0))]
    for t in range(prefill, idx.shape[1]):
        parts.append(unembed(run_blocks(model.embed(idx[:, t : t + 1]), 0, model.num_layers, cache=cache, pos=t)))
    return torch.cat(parts, dim=1).float()


def test_the_layout_follows_size_and_dtype(monkeypatch):
    model = tiny_model()
    assert layout_of(model) == FOLDED  # small fp32: the decoding copies pay
    monkeypatch.setattr(fastpath, "COPY_LIMIT_BYTES", weight_bytes(model) - 1)
    assert layout_of(model) == IN_PLACE  # above the limit: no copy
    monkeypatch.setattr(fastpath, "COPY_LIMIT_BYTES", weight_bytes(model))
    assert layout_of(model) == FOLDED
    for dtype in (torch.bfloat16, torch.float16):  # transposed half-precision products are slow on CPU
        assert layout_of(tiny_model().to(dtype)) == IN_PLACE
    assert weight_bytes(tiny_model(tie_embeddings=False)) > weight_bytes(model)  # a tied head counts once


@pytest.mark.parametrize("shape", list(SHAPES))
def test_in_place_layout_equals_the_plain_path_and_keeps_no_copy(no_copies, shape):
    model = tiny_model(**SHAPES[shape])
    idx = tokens(1, 24)
    with torch.no_grad():
        full = model(idx).logits
    with decoding():
        fast = FastDecoder.of(model)
        got = chunked_logits(model, fast.run_blocks, fast.unembed, idx)
        assert fast.layout == IN_PLACE
    assert_close(got, full, **TOL)
    prompt = idx[0, :6].tolist()
    ar = Autoregressive().generate(model, prompt, 12).tokens
    assert SelfSpeculative(2, 3).generate(model, prompt, 12).tokens == ar
    assert DynamicEarlyExit(2.0).generate(model, prompt, 12).tokens == ar  # unreachable threshold: the full model
    assert fast.copy_bytes() == 0  # no transposed or folded copy of any weight
    SelfSpeculative(2, 3, draft_vocab=10).generate(model, prompt, 12)
    assert fast.copy_bytes() == 10 * model.config.d_model * 4 + 10 * 8  # only the short head's rows and ids


def test_the_folded_layout_holds_copies_the_in_place_one_does_not(monkeypatch):
    """The memory test above could fail: below the limit the same decoding keeps a copy of every weight."""
    model = tiny_model()
    Autoregressive().generate(model, [1, 2, 3], 4)
    fast = FastDecoder.of(model)
    assert fast.layout == FOLDED and fast.copy_bytes() >= weight_bytes(model)
    monkeypatch.setattr(fastpath, "COPY_LIMIT_BYTES", 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # a change of the head: the layout is decided again, the copies dropped
    Autoregressive().generate(model, [1, 2, 3], 4)
    assert fast.layout == IN_PLACE and fast.copy_bytes() == 0


def test_dee_propagation_is_the_same_in_both_layouts(monkeypatch):
    """Exits at every layer: the fused propagation (folded) and the per-layer one (in place) fill the same cache."""
    results = {}
    for limit in (2**40, 0):
        monkeypatch.setattr(fastpath, "COPY_LIMIT_BYTES", limit)
        model = tiny_model(num_kv_heads=2)
        cache = model.new_cache()
        out = DynamicEarlyExit(0.0, min_exit_layer=1).generate(model, [3, 1, 4, 1, 5], 10, cache=cache)
        results[FastDecoder.of(model).layout] = out.tokens, cache.k[:, :, :, :14].clone(), cache.v[:, :, :, :14].clone()
    (tokens_f, k_f, v_f), (tokens_i, k_i, v_i) = results[FOLDED], results[IN_PLACE]
    assert tokens_f == tokens_i
    assert_close(k_f, k_i, **TOL)
    assert_close(v_f, v_i, **TOL)


# ----------------------------------------------------------------------------- half precision

# In place (half precision on CPU, or any model above the limit), the fast path runs the plain
# path's products on the same rows: bit for bit equal, unless the bf16 kernels run (their own
# float32 sums: tests/test_kernels.py). Folded (small models on a GPU), its copies round the norm
# gains and the attention scale into the weights once more. Either way: within 3% of the largest
# logit in bf16 (8 bits of mantissa), 0.6% in fp16.
HALF_TOL = {torch.bfloat16: 0.03, torch.float16: 0.006}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_half_precision_fast_path_equals_the_plain_path(dtype, shape, monkeypatch):
    model = tiny_model(**SHAPES[shape]).to(dtype)
    idx = tokens(1, 24)
    with decoding():
        plain = chunked_logits(model, model.run_blocks, model.unembed, idx)
        fast = FastDecoder.of(model)
        through_kernels = chunked_logits(model, fast.run_blocks, fast.unembed, idx)
        monkeypatch.setattr(kernels, "ENABLED", False)
        assert torch.equal(chunked_logits(model, fast.run_blocks, fast.unembed, idx), plain)
        assert fast.layout == IN_PLACE
    assert (through_kernels - plain).abs().max() <= HALF_TOL[dtype] * plain.abs().max()
    monkeypatch.setattr(fastpath, "transposed_products_pay", lambda *_: True)  # the folded layout, as on a GPU
    model = tiny_model(**SHAPES[shape]).to(dtype)
    with decoding():
        fast = FastDecoder.of(model)
        folded = chunked_logits(model, fast.run_blocks, fast.unembed, idx)
        assert fast.layout == FOLDED and fast.block(0).qkv_rot.dtype == dtype
    assert (folded - plain).abs().max() <= HALF_TOL[dtype] * plain.abs().max()
    assert not torch.equal(folded, plain)  # the tolerance is needed: rounding differs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_decoding_strategies_agree(dtype):
    model = tiny_model(num_kv_heads=2).to(dtype)
    prompt = tokens(1, 7, seed=3)[0].tolist()
    ar = Autoregressive().generate(model, prompt, 16).tokens
    for k in (1, 3, 6):
        assert SelfSpeculative(2, k).generate(model, prompt, 16).tokens == ar
    assert SelfSpeculative(2, 4, draft_vocab=20).generate(model, prompt, 16).tokens == ar
    assert DynamicEarlyExit(2.0).generate(model, prompt, 16).tokens == ar


# ----------------------------------------------------------------------------- the verifier's head


def test_rows_are_batched_where_a_few_cost_what_one_does():
    assert fastpath.rows_cost_alike(torch.bfloat16, CPU)
    assert not fastpath.rows_cost_alike(torch.float32, CPU) and not fastpath.rows_cost_alike(torch.float16, CPU)
    assert fastpath.rows_cost_alike(torch.float32, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_verifier_head_gives_the_same_tokens(dtype, monkeypatch):
    """The verifier's rows in one product (bf16 on CPU) or row by row (fp32): the same tokens as AR either way."""
    seen = []
    real = ssd_module.RowLogits.__init__

    def spy(self, fast, h, *, lazy):
        seen.append(lazy)
        real(self, fast, h, lazy=lazy)

    monkeypatch.setattr(ssd_module.RowLogits, "__init__", spy)
    model = tiny_model(seed=1, tie_embeddings=False).to(dtype)
    prompt = tokens(1, 9, seed=4)[0].tolist()
    ar = Autoregressive().generate(model, prompt, 20).tokens
    for k in (2, 5):
        runs, lazy_rounds = {}, {}
        for lazy in (True, False):
            strategy = SelfSpeculative(2, k)
            strategy.lazy_head = lazy  # False: always batched
            seen.clear()
            runs[lazy] = strategy.generate(model, prompt, 20)
            lazy_rounds[lazy] = set(seen)
        assert runs[True].tokens == runs[False].tokens == ar
        assert runs[True].stats == runs[False].stats
        assert lazy_rounds == {True: {dtype != torch.bfloat16}, False: {False}}  # the default: batched in bf16


# ----------------------------------------------------------------------------- short head, threads


def test_short_head_without_token_counts_ranks_by_the_tokenizers_order():
    """No counts (e.g. a checkpoint imported from Hugging Face): the first N ids, the tokenizer's order
    (BPE merges and SentencePiece scores give frequent pieces low ids); any vocabulary size works."""
    model = tiny_model(vocab_size=5000, d_model=16, num_heads=2, d_ff=32)
    assert model.token_counts is None
    h = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(0))
    with decoding():
        logits, ids = FastDecoder.of(model).unembed_short(h, 1024)
    assert ids.tolist() == list(range(1024))
    assert_close(logits, model.unembed(h)[..., :1024], **TOL)
    counts = torch.zeros(5000, dtype=torch.long)
    counts[[4999, 7, 2500]] = torch.tensor([5, 5, 9])  # ties keep id order; the result is sorted by id
    model.set_token_counts(counts)
    assert model.frequent_ids(3).tolist() == [7, 2500, 4999]
    assert model.frequent_ids(4).tolist() == [0, 7, 2500, 4999]


def test_decoding_threads_rule():
    torchs = dict(kernels_run=False)  # torch's kernels: a small model's step is dispatch-bound
    assert decoding_threads(2_600_000, "cpu", cores=8, load=0.0, **torchs) == 1  # a small model: one thread
    assert decoding_threads(THREADS_MIN_PARAMETERS - 1, "cpu", cores=8, load=0.0, **torchs) == 1
    assert decoding_threads(THREADS_MIN_PARAMETERS, "cpu", cores=8, load=0.3, **torchs) == 8  # every core
    assert decoding_threads(2_600_000, "cpu", cores=8, load=0.0, kernels_run=True) == 8  # layerskip's: every core
    assert decoding_threads(2_600_000, "cpu", cores=2, load=1.2, kernels_run=True) == 1  # ... that is idle
    assert decoding_threads(7_000_000_000, torch.device("cpu"), cores=8, load=3.7) == 5  # only the idle ones
    assert decoding_threads(7_000_000_000, "cpu", cores=2, load=5.0) == 1  # a busy machine: one
    assert decoding_threads(7_000_000_000, "cuda", cores=8, load=0.0) == 1  # the host only launches kernels
    assert 1 <= decoding_threads(7_000_000_000, "cpu") <= idle_cores() <= available_cores()

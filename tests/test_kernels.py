"""The bf16 decoding kernel (layerskip.kernels): its products against a float64 reference, a row's
bits independent of the other rows, every fallback to F.linear, its build cache, and models decoding
through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from layerskip import fastblock, kernels
from layerskip.decoding import Autoregressive, DynamicEarlyExit, SelfSpeculative
from layerskip.decoding import dee as dee_module
from layerskip.decoding.measures import ExitClassifier
from layerskip.fastblock import FastBlock
from layerskip.fastpath import FastDecoder, decoding

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"bf16 kernel {kernels.status()}")


def bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """The kernel decided again, built into an empty cache; the process's own decision restored after."""
    monkeypatch.setenv("LAYERSKIP_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "ENABLED", True)  # even where LAYERSKIP_KERNELS=0 runs the rest on torch
    kernels._library.cache_clear()
    yield tmp_path
    kernels._library.cache_clear()


# ----------------------------------------------------------------------------- the products


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 13, kernels.MAX_ROWS])
@pytest.mark.parametrize("out_features, in_features", [(64, 256), (37, 70), (130, 1000)])
def test_products_are_within_bf16_rounding_of_a_float64_reference(rows, out_features, in_features):
    """Odd sizes too: the last K % 32 columns (masked loads) and the last N % 4 weight rows."""
    wide = bf16(rows, in_features + 8, seed=1)
    x = wide[:, 3 : 3 + in_features]  # rows apart by more than their length
    w = bf16(out_features, in_features, seed=2)
    with torch.inference_mode():
        got = kernels.linear(x, w)
    exact = x.double() @ w.double().t()
    # rounding the float32 sum to bf16 (2^-8 relative) + float32 summation (K * 2^-24 of sum |x_k w_k|)
    bound = exact.abs() * 2**-8 + in_features * 2**-22 * (x.double().abs() @ w.double().abs().t())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    assert ((got.double() - exact).abs() <= bound).all()


@needs_kernel
def test_bf16_decoding_runs_the_kernels_not_torchs(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("torch's product or attention ran")

    model = wide_bf16_model()
    prompt = torch.randint(0, 300, (7,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = Autoregressive().generate(model, prompt, 6).tokens
    monkeypatch.setattr(kernels.F, "linear", refuse)
    monkeypatch.setattr(fastblock, "causal_attention", refuse)
    assert Autoregressive().generate(model, prompt, 6).tokens == expected  # the prefill's 7 rows too
    assert SelfSpeculative(2, 3).generate(model, prompt, 6).tokens == expected


@needs_kernel
def test_a_row_gets_the_same_bits_alone_and_among_other_rows():
    """What makes verifying k drafts in one product give the logits of k one-row steps."""
    x, w = bf16(kernels.MAX_ROWS, 300, seed=5), bf16(77, 300, seed=6)
    with torch.inference_mode():
        together = kernels.linear(x, w)
        for i in range(len(x)):
            assert torch.equal(kernels.linear(x[i : i + 1], w), together[i : i + 1])
        assert torch.equal(kernels.linear(x[5:10], w), together[5:10])


@needs_kernel
def test_leading_dimensions_are_kept():
    x, w = bf16(1, 3, 96, seed=7), bf16(40, 96, seed=8)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, w), kernels.linear(x[0], w).unsqueeze(0))


@pytest.mark.parametrize("case", ["float32", "too_many_rows", "gradient", "transposed_weight", "switched_off"])
def test_everything_else_is_f_linear(case, monkeypatch):
    x, w = bf16(4, 64, seed=9), bf16(32, 64, seed=10)
    if case == "float32":
        x, w = x.float(), w.float()
    elif case == "too_many_rows":
        x = bf16(kernels.MAX_ROWS + 1, 64, seed=11)
    elif case == "gradient":
        w.requires_grad_(True)
    elif case == "transposed_weight":
        w = bf16(64, 32, seed=12).t()
    else:
        monkeypatch.setattr(kernels, "ENABLED", False)
        assert kernels.status() == "off: LAYERSKIP_KERNELS=0" and not kernels.available()
    got = kernels.linear(x, w)
    assert torch.equal(got, F.linear(x, w))
    if case == "gradient":
        got.sum().backward()
        assert w.grad is not None


def causal_reference(q, k, v, scale):
    """float64 causal attention of q's T rows at the last T of S positions, GQA as SDPA's -> (B * T, H * D)."""
    b, heads, t, d = q.shape
    s, groups = k.shape[2], heads // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    visible = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b * t, heads * d)


def cached_kv(b, kv_heads, s, d, seed, room=8):
    """Keys and values as a KV cache returns them: the first s of a longer buffer's positions."""
    k, v = (bf16(b, kv_heads, s + room, d, seed=seed + i).narrow(2, 0, s) for i in (0, 1))
    return k, v


@needs_kernel
@pytest.mark.parametrize("queries", [1, 2, 5, kernels.MAX_ROWS])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (8, 2, 40), (6, 3, 72)])
def test_attention_is_within_rounding_of_a_float64_reference(queries, heads, kv_heads, head_dim):
    b, s = 2, 29
    q = bf16(b, queries, heads, head_dim, seed=20).transpose(1, 2)  # as the block makes them: (B, T, H, D) memory
    k, v = cached_kv(b, kv_heads, s, head_dim, seed=21)
    assert kernels.attends(q, k, v)
    with torch.inference_mode():
        got = kernels.attention(q, k, v, head_dim**-0.5)
    exact = causal_reference(q, k, v, head_dim**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (b * queries, heads * head_dim)
    # the float32 result rounded to bf16 (2^-8 relative), float32 sums well below that
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4 * v.double().abs().max()).all()


@needs_kernel
def test_an_attention_row_gets_the_same_bits_alone_and_among_other_rows():
    """Verification's row i against the one-query step at its position (keys up to it, no mask)."""
    heads, kv_heads, d, s, t = 8, 2, 64, 40, 13
    q = bf16(1, heads, t, d, seed=22)
    k, v = cached_kv(1, kv_heads, s, d, seed=23)
    with torch.inference_mode():
        together = kernels.attention(q, k, v, 0.125)
        for i in range(t):
            keys = s - t + i + 1
            alone = kernels.attention(q[:, :, i : i + 1], k[:, :, :keys], v[:, :, :keys], 0.125)
            assert torch.equal(alone, together[i : i + 1])


@pytest.mark.parametrize("case", ["float32", "too_many_queries", "more_queries_than_keys", "gradient",
                                  "head_groups", "switched_off"])
def test_attention_leaves_everything_else_to_torch(case, monkeypatch):
    q, (k, v) = bf16(1, 4, 3, 16, seed=24), cached_kv(1, 2, 10, 16, seed=25)
    if case == "float32":
        q, k, v = q.float(), k.float(), v.float()
    elif case == "too_many_queries":
        q, (k, v) = bf16(1, 4, kernels.MAX_ROWS + 1, 16, seed=26), cached_kv(1, 2, 40, 16, seed=27)
    elif case == "more_queries_than_keys":
        k, v = k[:, :, :2], v[:, :, :2]
    elif case == "gradient":
        q.requires_grad_(True)
    elif case == "head_groups":
        k, v = cached_kv(1, 3, 10, 16, seed=28)
    else:
        monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.attends(q, k, v)


# ----------------------------------------------------------------------------- building it


@needs_kernel
def test_the_kernel_is_compiled_once_into_the_cache(fresh_build):
    assert kernels.status().endswith("(compiled now)")
    built = kernels.library_path()
    assert built.parent == fresh_build and built.exists()
    stamp = built.stat().st_mtime_ns
    kernels._library.cache_clear()  # as a new process would
    assert kernels.status() == f"on: {built}" and built.stat().st_mtime_ns == stamp
    assert [p.name for p in fresh_build.iterdir()] == [built.name]  # no temporary file left


@needs_kernel
def test_a_damaged_cached_kernel_is_built_again(fresh_build):
    kernels.library_path().parent.mkdir(parents=True, exist_ok=True)
    kernels.library_path().write_bytes(b"not a shared library")
    assert kernels.status().endswith("(compiled now)") and kernels.available()


def test_without_a_compiler_decoding_uses_f_linear_and_says_why(fresh_build, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set(kernels.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    assert kernels.status().startswith(f"off: could not compile {kernels.SOURCE.name}")
    assert "decoding on CPU uses torch's slower calls instead" in capsys.readouterr().err
    x, w = bf16(2, 64, seed=13), bf16(8, 64, seed=14)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def test_a_cpu_without_avx512_bf16_never_compiles(fresh_build, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert kernels.status() == "off: the CPU lacks avx512bw, avx512vl, avx512_bf16"
    assert not any(fresh_build.iterdir())


# ----------------------------------------------------------------------------- models


def wide_bf16_model(seed: int = 0):
    """Products long enough (K = 256, 512) for the kernel's roundings to differ from oneDNN's."""
    return tiny_model(seed=seed, d_model=256, num_heads=4, num_kv_heads=2, d_ff=512, vocab_size=300).to(torch.bfloat16)


def stepwise_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with decoding():
        fast, cache = FastDecoder.of(model), model.new_cache()
        rows = [fast.unembed(fast.run_blocks(model.embed(idx[:, t : t + 1]), 0, model.num_layers, cache=cache, pos=t))
                for t in range(idx.shape[1])]
    return torch.cat(rows, dim=1).float()


@needs_kernel
def test_decoding_through_the_kernel_stays_within_bf16_rounding_of_torchs_products(monkeypatch):
    model = wide_bf16_model()
    idx = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    ours = stepwise_logits(model, idx)
    monkeypatch.setattr(kernels, "ENABLED", False)
    torchs = stepwise_logits(model, idx)
    assert not torch.equal(ours, torchs)
    assert (ours - torchs).abs().max() <= 0.03 * torchs.abs().max()  # test_fastpath_scale's bf16 tolerance


@needs_kernel
def test_a_prefill_gives_the_bits_of_one_token_at_a_time():
    """Whole rows are invariant through the kernel and through SDPA's causal path from position 0."""
    model = wide_bf16_model(seed=1)
    idx = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with decoding():
        fast = FastDecoder.of(model)
        prefill = fast.unembed(fast.run_blocks(model.embed(idx), 0, model.num_layers, cache=model.new_cache()))
    assert torch.equal(prefill.float(), stepwise_logits(model, idx))


@needs_kernel
@pytest.mark.parametrize("seed", [0, 2])
def test_strategies_agree_in_bf16_through_the_kernel(seed):
    model = wide_bf16_model(seed)
    prompt = torch.randint(0, 300, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    ar = Autoregressive().generate(model, prompt, 20).tokens
    for k in (1, 3, 6):
        assert SelfSpeculative(2, k).generate(model, prompt, 20).tokens == ar
    assert SelfSpeculative(2, 4, draft_vocab=64).generate(model, prompt, 20).tokens == ar
    assert DynamicEarlyExit(2.0).generate(model, prompt, 20).tokens == ar


# ----------------------------------------------------------------------------- float32 blocks

F32_SHAPES = {"mha": dict(), "gqa": dict(num_kv_heads=2), "odd": dict(d_model=40, num_heads=4, d_ff=72),
              "wide": dict(d_model=96, num_heads=4, d_ff=200, vocab_size=300)}


def chunked(model, idx: torch.Tensor, chunks: list[int], *, logits: bool = True) -> torch.Tensor:
    """Logits (or last hidden states) of idx through the fast path, fed in chunks of these sizes, with a cache."""
    assert sum(chunks) == idx.shape[1]
    with decoding():
        fast, cache, pos, parts = FastDecoder.of(model), model.new_cache(), 0, []
        for size in chunks:
            h = fast.run_blocks(model.embed(idx[:, pos : pos + size]), 0, model.num_layers, cache=cache, pos=pos)
            parts.append(fast.unembed(h) if logits else h)
            pos += size
    return torch.cat(parts, dim=1)


@needs_kernel
@pytest.mark.parametrize("shape", list(F32_SHAPES))
def test_f32_blocks_equal_torchs_within_float32_rounding(shape, monkeypatch):
    model = tiny_model(**F32_SHAPES[shape])
    idx = torch.randint(0, model.config.vocab_size, (1, 31), generator=torch.Generator().manual_seed(3))
    chunks = [5, 1, 1, 7, 16, 1]  # a prefill, single steps, a verification's rows, the most rows it takes
    ours = chunked(model, idx, chunks)
    assert FastDecoder.of(model).block(0).native is not None
    monkeypatch.setattr(kernels, "ENABLED", False)
    torchs = chunked(model, idx, chunks)
    with torch.no_grad():
        plain = model(idx).logits
    # float32 sums in another order: round-off relative to the largest logit (up to 2e-6 measured)
    atol = 4e-6 * plain.abs().max()
    torch.testing.assert_close(ours, torchs, rtol=0, atol=atol)
    torch.testing.assert_close(ours, plain, rtol=0, atol=atol)
    assert not torch.equal(ours, torchs)  # the kernel ran


@needs_kernel
def test_f32_block_rows_get_the_same_bits_alone_and_together():
    """The blocks' rows, on one thread or two (the head is MKL's product: float32 verification unembeds
    row by row)."""
    model = tiny_model(num_kv_heads=2)
    idx = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = chunked(model, idx, [8, 16], logits=False)
        assert torch.equal(together, chunked(model, idx, [8] + [1] * 16, logits=False))
        torch.set_num_threads(2)  # threads share the products' columns, each output computed alike
        assert torch.equal(together, chunked(model, idx, [8, 3, 13], logits=False))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_f32_block_runs_rather_than_torchs_products(monkeypatch):
    model = tiny_model()
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = Autoregressive().generate(model, prompt, 8).tokens
    monkeypatch.setattr(fastblock, "attend_scaled", lambda *_, **__: pytest.fail("torch's block ran"))
    assert Autoregressive().generate(model, prompt, 8).tokens == expected
    assert SelfSpeculative(2, 3).generate(model, prompt, 8).tokens == expected


@pytest.mark.parametrize("case", ["batch_of_two", "cache_of_two", "too_many_rows", "no_cache", "bf16", "gradient",
                                  "switched_off"])
def test_f32_block_leaves_everything_else_to_torch(case, monkeypatch):
    model = tiny_model()
    with torch.no_grad():
        block = FastBlock.of(model.layers[0])
    x, cache = torch.randn(1, 3, model.config.d_model), model.new_cache()
    if case == "batch_of_two":
        x = torch.randn(2, 3, model.config.d_model)
    elif case == "cache_of_two":
        cache = model.new_cache(batch_size=2)
    elif case == "too_many_rows":
        x = torch.randn(1, kernels.MAX_ROWS + 1, model.config.d_model)
    elif case == "no_cache":
        cache = None
    elif case == "bf16":
        with torch.no_grad():
            block = FastBlock.of(tiny_model().to(torch.bfloat16).layers[0])
        assert block.native is None
    elif case == "gradient":
        x.requires_grad_(True)
    else:
        monkeypatch.setattr(kernels, "ENABLED", False)
    with torch.enable_grad():
        assert not kernels.runs_f32_block(block.native, x, cache)


# ----------------------------------------------------------------------------- DEE through the kernel


@needs_kernel
@pytest.mark.parametrize("exit_vocab", [None, 64])
def test_dee_exits_alike_with_the_kernel_check_and_torchs(exit_vocab, monkeypatch):
    model = tiny_model(num_kv_heads=2)
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(7)).tolist()
    exited = set()
    for threshold in (0.05, 0.1, 0.2, 0.3):
        dee = DynamicEarlyExit(threshold, exit_vocab=exit_vocab)
        monkeypatch.setattr(kernels, "ENABLED", True)
        ours = dee.generate(model, prompt, 24)
        monkeypatch.setattr(kernels, "ENABLED", False)
        torchs = dee.generate(model, prompt, 24)
        assert ours.tokens == torchs.tokens and ours.stats["exit_layers"] == torchs.stats["exit_layers"]
        exited |= set(ours.stats["exit_layers"])
    assert len(exited) > 2  # tokens left at several layers, not all at the last


# ----------------------------------------------------------------------------- whole float32 steps


def block_by_block(model, prompt: torch.Tensor, token: torch.Tensor, end: int):
    """(hidden, cache) of `token` after blocks [0, end), one f32_block call per block, after the prompt."""
    with decoding():
        fast, cache = FastDecoder.of(model), model.new_cache()
        rope = model.rotary(0, prompt.shape[1])
        h = model.embed(prompt)
        for layer in range(model.num_layers):
            h = fast.block(layer)(h, *rope, cache, layer, 0)
        pos = prompt.shape[1]
        h, rope = model.embed(token), model.rotary(pos, 1)
        for layer in range(end):
            h = fast.block(layer)(h, *rope, cache, layer, pos)
    return h, cache


def prefilled(model, prompt: torch.Tensor):
    with decoding():
        cache = model.new_cache()
        FastDecoder.of(model).run_blocks(model.embed(prompt), 0, model.num_layers, cache=cache, pos=0)
    return cache


@needs_kernel
@pytest.mark.parametrize("shape", ["mha", "gqa", "odd"])
@pytest.mark.parametrize("vocab", [None, 40])
def test_a_step_in_one_call_gives_the_bits_of_the_blocks_one_call_each(shape, vocab):
    model = tiny_model(**F32_SHAPES[shape])
    model.set_token_counts(torch.arange(model.config.vocab_size).flip(0))
    g = torch.Generator().manual_seed(8)
    prompt, token = torch.randint(0, 97, (1, 9), generator=g), torch.randint(0, 97, (1, 1), generator=g)
    for end in (2, model.num_layers):
        expected, expected_cache = block_by_block(model, prompt, token, end)
        cache = prefilled(model, prompt)
        with decoding():
            fast = FastDecoder.of(model)
            hidden, logits, ids = fast.step(token, 9, cache, end=end, vocab=vocab)
            head = fast.unembed(expected)[0, -1] if vocab is None else fast.unembed_short(expected, vocab)[0][0, -1]
        assert torch.equal(hidden, expected)  # the same kernel per block: the same bits
        assert torch.equal(cache.k, expected_cache.k) and torch.equal(cache.v, expected_cache.v)
        assert cache.lengths == [10] * end + [9] * (model.num_layers - end)
        assert torch.equal(logits, head)  # unembed's rows run the step's own head kernel
        assert (ids is None) == (vocab is None)


def native_and_stepwise(model, prompt, token, threshold, exit_vocab, measure="softmax", classifier=None):
    """DEE's one-call step and its layer-by-layer step on the same prefilled caches."""
    dee = DynamicEarlyExit(threshold, measure=measure, exit_vocab=exit_vocab, classifier=classifier)
    results = []
    for native in (True, False):
        cache = prefilled(model, prompt)
        with decoding():
            fast = FastDecoder.of(model)
            checks = dee.check_model(model)
            if native:
                policy = dee.native_policy(fast, checks)
                assert policy is not None
                step = dee.native_step(fast, token, prompt.shape[1], cache, checks, policy)
            else:
                step = dee.step(fast, token, prompt.shape[1], cache, checks)
        results.append((step, cache))
    return results


SWEEPS = {"softmax": (0.0, 0.05, 0.08, 0.12, 0.15, 0.25, 2.0), "margin": (0.0, 0.02, 0.05, 0.1, 2.0),
          "saturation": (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 2.0)}


def one_call_exits(thresholds, exit_vocab, measure, classifier=None, seed=9, tokens=12) -> set[int]:
    """DEE's one-call step against its layer-by-layer step for random tokens after a prompt, at each threshold:
    the same exits and head counts, the same logits and cache up to float32 rounding; returns the exits seen."""
    model = tiny_model(num_kv_heads=2)
    model.set_token_counts(torch.arange(model.config.vocab_size).flip(0))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 97, (1, 7), generator=g)
    exits = set()
    for token in torch.randint(0, 97, (tokens, 1, 1), generator=g):
        for threshold in thresholds:
            (ours, cache), (reference, expected_cache) = native_and_stepwise(model, prompt, token, threshold,
                                                                            exit_vocab, measure, classifier)
            exits.add(ours.exit_layer)
            assert ours.exit_layer == reference.exit_layer
            assert (ours.head_evals, ours.short_head_evals, ours.kv_projections) == (
                reference.head_evals, reference.short_head_evals, reference.kv_projections)
            scale = reference.logits[reference.logits.isfinite()].abs().max()
            torch.testing.assert_close(ours.logits, reference.logits, rtol=0, atol=1e-5 * scale)
            assert cache.lengths == expected_cache.lengths == [8] * model.num_layers
            # propagated keys and values: the same columns summed in another order than torch's stacked product
            torch.testing.assert_close(cache.k, expected_cache.k, rtol=0, atol=1e-5 * expected_cache.k.abs().max())
            torch.testing.assert_close(cache.v, expected_cache.v, rtol=0, atol=1e-5 * expected_cache.v.abs().max())
    return exits


@needs_kernel
@pytest.mark.parametrize("measure", list(SWEEPS))
@pytest.mark.parametrize("exit_vocab", [None, 40])
def test_dee_in_one_call_exits_where_the_layer_by_layer_step_does(exit_vocab, measure):
    exits = one_call_exits(SWEEPS[measure], exit_vocab, measure)
    assert exits == {1, 2, 3, 4}  # threshold 0 exits at 1, 2.0 never; the others in between


def random_classifier(width: int, hidden: int, vocab: int, layers=(1, 2, 3), seed: int = 0) -> ExitClassifier:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, width + 2)] if hidden == 0 else [(hidden, width + 2), (1, hidden)]
    nets = {layer: [(torch.randn(s, generator=g) * 0.3, torch.randn(s[0], generator=g)) for s in shapes]
            for layer in layers}
    return ExitClassifier(vocab=vocab, layers=nets)


@needs_kernel
@pytest.mark.parametrize("hidden", [0, 8])
@pytest.mark.parametrize("exit_vocab", [None, 20, 40])  # 20: the classifier's own short head, whose logits exit
def test_the_learned_classifier_in_one_call_exits_where_the_layer_by_layer_step_does(hidden, exit_vocab):
    classifier = random_classifier(tiny_model().config.d_model, hidden, vocab=20, seed=1)
    thresholds = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 2.0)
    exits = one_call_exits(thresholds, exit_vocab, "classifier", classifier, seed=11, tokens=10)
    assert exits == {1, 2, 3, 4}


@needs_kernel
def test_decoding_runs_one_call_per_step_not_one_per_block(monkeypatch):
    model = tiny_model()
    model.set_token_counts(torch.arange(model.config.vocab_size).flip(0))
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(10)).tolist()
    expected = Autoregressive().generate(model, prompt, 12).tokens
    dee = DynamicEarlyExit(0.1, exit_vocab=40)
    exits = dee.generate(model, prompt, 12).stats["exit_layers"]
    learned = DynamicEarlyExit(0.5, measure="classifier", exit_vocab=20,
                               classifier=random_classifier(model.config.d_model, 8, vocab=20, seed=1))
    learned_exits = learned.generate(model, prompt, 12).stats["exit_layers"]
    monkeypatch.setattr(kernels, "f32_block", lambda *_, **__: pytest.fail("a block ran on its own"))
    monkeypatch.setattr(dee_module, "checked_exit", lambda *_, **__: pytest.fail("a check ran on its own"))
    monkeypatch.setattr(ExitClassifier, "confidence", lambda *_, **__: pytest.fail("a classifier ran on its own"))
    assert learned.generate(model, prompt, 12).stats["exit_layers"] == learned_exits
    assert Autoregressive().generate(model, prompt[-1:], 12).tokens  # no prefill: the steps alone
    assert Autoregressive().generate(model, prompt, 12).tokens == expected
    assert SelfSpeculative(2, 3, draft_vocab=40).generate(model, prompt, 12).tokens == expected
    assert dee.generate(model, prompt, 12).stats["exit_layers"] == exits
    assert len(set(exits)) > 1


def test_exit_thresholds_round_up_to_the_next_float32():
    """A float32 confidence c passes t exactly when it passes the kernel's float32 threshold."""
    head = torch.zeros(4, 8)
    thresholds = [0.1, 0.5, 1 / 3, float("inf"), 0.0]
    policy, _ = kernels.exit_policy(thresholds, head, "softmax")
    values = policy._keep[0]
    for t, v in zip(thresholds, values.tolist()):
        assert v >= t
        below = torch.nextafter(torch.tensor(v), torch.tensor(-float("inf"))).item()
        assert below < t or t == float("inf")
    assert values[1].item() == 0.5 and values[4].item() == 0.0  # exact ones stay


def test_a_step_beyond_the_context_is_refused_before_anything_runs():
    from layerskip.errors import PromptError

    model = tiny_model()  # context 64
    cache = model.new_cache(max_len=80)
    cache.lengths = [64] * model.num_layers
    with decoding(), pytest.raises(PromptError, match="beyond the model's context"):
        FastDecoder.of(model).step(torch.tensor([[1]]), 64, cache)
    assert cache.lengths == [64] * model.num_layers

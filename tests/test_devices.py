"""Decoding on every device there is: the fast path equals the plain path, and greedy SSD and DEE equal AR.

Each test runs on the CPU and, where CUDA is present, on the GPU (skipped without it);
benchmarks/gpu_check.sh runs the CUDA ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens as tokens
from conftest import tiny_model
from torch.testing import assert_close

from layerskip import fastpath
from layerskip.decoding import Autoregressive, DynamicEarlyExit, SamplingConfig, SelfSpeculative
from layerskip.fastpath import FastDecoder, decoding

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
HALF_TOL = 0.03  # bf16, folded copies (as on a GPU): within 3% of the largest logit (see test_fastpath_scale)


def on(device: str, **overrides) -> torch.nn.Module:
    return tiny_model(**overrides).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("limit", [2**40, 0], ids=["folded", "in_place"])
def test_fast_path_equals_the_plain_path(device, dtype, limit, monkeypatch):
    monkeypatch.setattr(fastpath, "COPY_LIMIT_BYTES", limit)
    model = on(device, num_kv_heads=2).to(dtype)
    idx = tokens(1, 22).to(device)

    def logits(run_blocks, unembed) -> torch.Tensor:
        cache = model.new_cache()
        parts = [unembed(run_blocks(model.embed(idx[:, :4]), 0, model.num_layers, cache=cache, pos=0))]
        for t in range(4, idx.shape[1]):
            parts.append(unembed(run_blocks(model.embed(idx[:, t : t + 1]), 0, model.num_layers, cache=cache, pos=t)))
        return torch.cat(parts, dim=1).float()

    with decoding():
        plain = logits(model.run_blocks, model.unembed)
        fast = FastDecoder.of(model)
        got = logits(fast.run_blocks, fast.unembed)
        short, ids = fast.unembed_short(model.embed(idx), 10)
    assert got.device.type == device and ids.device.type == device
    if dtype == torch.float32:
        assert_close(got, plain, rtol=1e-4, atol=1e-4)
    else:
        assert (got - plain).abs().max() <= HALF_TOL * plain.abs().max()
    with torch.no_grad():
        expected = model.unembed_short(model.embed(idx), 10)[0]
    assert (short.float() - expected.float()).abs().max() <= 0.01 * expected.float().abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("draft_vocab", [None, 12])
def test_greedy_ssd_and_dee_equal_ar(device, draft_vocab):
    for kwargs in (dict(seed=0), dict(seed=1, tie_embeddings=False), dict(seed=0, num_kv_heads=2)):
        model = on(device, **kwargs)
        prompt = tokens(1, 7, seed=2)[0].tolist()
        ar = Autoregressive().generate(model, prompt, 24).tokens
        for draft_layer in (1, 2, 3):
            for k in (1, 3, 6):
                assert SelfSpeculative(draft_layer, k, draft_vocab=draft_vocab).generate(model, prompt, 24).tokens == ar
        assert DynamicEarlyExit(2.0).generate(model, prompt, 24).tokens == ar  # unreachable threshold


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_and_early_exits_run_on_the_device(device):
    """Sampled SSD and DEE with exits (K/V propagation) on the device, with a generator on it."""
    model = on(device)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9)
    for strategy in (SelfSpeculative(2, 3), DynamicEarlyExit(0.0), DynamicEarlyExit(0.3, exit_vocab=20)):
        generator = torch.Generator(device=device).manual_seed(0)
        out = strategy.generate(model, [1, 2, 3], 12, sampling=sampling, generator=generator)
        assert len(out.tokens) == 12 and all(0 <= t < model.config.vocab_size for t in out.tokens)

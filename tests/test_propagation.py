"""CALM K/V propagation: the fused product equals the per-layer projections, and is rebuilt only when weights change."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from layerskip.decoding.propagation import FusedPropagation, propagate_kv

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=2)], ids=["mha", "gqa"])
def test_fused_propagation_equals_per_layer_project_kv(overrides):
    model = tiny_model(seed=2, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) + 0.5)
        h = torch.randn(1, 1, model.config.d_model, generator=torch.Generator().manual_seed(5))
        fused = FusedPropagation(model)
        for start in range(model.num_layers):
            a, b = model.new_cache(), model.new_cache()
            for cache in (a, b):
                model(torch.tensor([[3, 1, 4]]), cache=cache)
            assert propagate_kv(model, h, start, 3, a) == fused(model, h, start, 3, b) == model.num_layers - start
            assert a.lengths == b.lengths == [3] * start + [4] * (model.num_layers - start)
            torch.testing.assert_close(b.k, a.k, **TOL)
            torch.testing.assert_close(b.v, a.v, **TOL)


def test_fused_propagation_is_built_once_and_follows_weight_changes():
    model = tiny_model(seed=2)
    first = FusedPropagation.for_model(model)
    assert FusedPropagation.for_model(model) is first
    with torch.no_grad():
        model.layers[1].attn.v_proj.weight.mul_(2.0)
    second = FusedPropagation.for_model(model)
    assert second is not first
    torch.testing.assert_close(second.weight, FusedPropagation(model).weight)

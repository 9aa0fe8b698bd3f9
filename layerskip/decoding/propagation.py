"""CALM-style K/V propagation: the keys and values of the layers an early-exiting token skipped.

A token that exits after block e has no K/V in layers [e, L), yet later tokens attend to it
there. Its exited hidden state h_e is copied up to every skipped layer j and that layer's
K/V are computed from it: ``k, v = layers[j].attn.project_kv(layers[j].attn_norm(h_e))`` at
the token's rotary position, written with ``cache.write(j, pos, k, v)``. Every layer's
cache then holds every position (``cache.lengths`` all equal); the cost is two d_model x
d_model projections per skipped layer, done for all of them in one batched product
(``FusedPropagation``, equal to the per-layer ``propagate_kv`` up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from layerskip.cache import KVCache
from layerskip.fastpath import FOLDED, FastDecoder
from layerskip.model import Transformer, normalize


def propagate_kv(model: Transformer, hidden: torch.Tensor, start: int, pos: int, cache: KVCache) -> int:
    """CALM propagation: K/V of layers [start, L) for hidden (1, T, C) at positions [pos, pos+T).

    Each skipped layer j sees the exited hidden state as its input: its keys and values
    are ``project_kv(attn_norm_j(hidden))``. Returns the number of layers written.
    """
    cos, sin = model.rotary(pos, hidden.shape[1])
    for j in range(start, model.num_layers):
        block = model.layers[j]
        k, v = block.attn.project_kv(block.attn_norm(hidden), cos, sin)
        cache.write(j, pos, k, v)
    return model.num_layers - start


class FusedPropagation:
    """``propagate_kv`` in one batched product for all skipped layers (the same K/V up to rounding).

    attn_norm_j(h) = w_j * n(h) with n the weightless RMS normalisation, so layer j's keys
    and values are (W_kv_j diag(w_j)) n(h): exactly the key, value and rotated-key columns
    of the blocks' ``FastBlock.qkv_rot``, which already fold the norm weights in. Stacked over
    the layers, they give every skipped layer's K/V from one product, rotary as one
    multiply-add, and one copy into the cache.
    """

    @classmethod
    def for_model(cls, model: Transformer) -> FusedPropagation | Callable[..., int]:
        """The model's FusedPropagation, built once and rebuilt only when a weight it folds changes.

        Stacking the weights costs milliseconds, a noticeable share of a short generation.
        A model decoded from its own weights (``fastpath.IN_PLACE``: large, or half precision on
        CPU) gets ``propagate_kv``: stacking would copy its K/V weights, and there a product per
        layer costs no more than the fused one.
        """
        if FastDecoder.of(model).layout != FOLDED:
            return propagate_kv
        def sources() -> tuple[torch.Tensor, ...]:
            return tuple(w for b in model.layers for w in (b.attn.k_proj.weight, b.attn.v_proj.weight,
                                                           b.attn_norm.weight))

        return FastDecoder.of(model).copies.get("propagation", sources, lambda: cls(model)) or cls(model)

    def __init__(self, model: Transformer) -> None:
        fast = FastDecoder.of(model)
        blocks = [fast.block(layer) for layer in range(model.num_layers)]
        self.eps, self.kv_heads = blocks[0].eps, blocks[0].kv_heads
        self.head_dim = model.config.head_dim
        self.num_layers = len(blocks)
        q, kv = blocks[0].heads * self.head_dim, self.kv_heads * self.head_dim  # column widths in qkv_rot
        keys, values, rotated_keys = slice(q, q + kv), slice(q + kv, q + 2 * kv), slice(2 * q + 2 * kv, None)
        self.weight = torch.stack([
            torch.cat((b.qkv_rot[:, keys], b.qkv_rot[:, rotated_keys], b.qkv_rot[:, values]), dim=1) for b in blocks
        ])  # (L, C, 3 * H_kv * D): keys | rotated keys | values

    def __call__(self, model: Transformer, hidden: torch.Tensor, start: int, pos: int, cache: KVCache) -> int:
        """K/V of layers [start, L) for the exited hidden (1, 1, C) at position pos."""
        count = self.num_layers - start
        kv = torch.matmul(normalize(hidden.reshape(1, -1), self.eps), self.weight[start:])  # (count, 1, 3 * H_kv * D)
        kv = kv.view(count, 1, 3, self.kv_heads, 1, self.head_dim)  # (count, B=1, k|rot k|v, H_kv, T=1, D)
        cos, sin = model.rotary(pos, 1)
        keys = torch.addcmul(kv[:, :, 0] * cos, kv[:, :, 1], sin)
        cache.write_layers(start, pos, keys, kv[:, :, 2])
        return count

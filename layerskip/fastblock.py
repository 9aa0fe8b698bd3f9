"""One block's forward for decoding, in fastpath's two layouts: ``FastBlock`` (folded copies of the
weights; one kernel call for a few float32 rows on a CPU with layerskip's kernels) and
``InPlaceBlock`` (the block's own weights), with the attention both use (``attend_scaled``).
``fastpath.FastDecoder`` builds them and keeps them fresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerskip import kernels
from layerskip.cache import KVCache
from layerskip.model import Block, RMSNorm, apply_rotary, causal_attention, causal_mask, normalize

PLAIN_ATTENTION_MAX_QUERIES = 16  # above this many queries, SDPA is faster than plain products


def rotate_half_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows R such that R x = rotate_half(W x) for every head: (heads * D, C) -> the same shape.

    Projecting with [W; R] gives a head's rotated copy with the projection itself, so rotary
    embedding becomes x * cos + rotated * sin with no slicing or concatenation per token.
    """
    half = head_dim // 2
    w = weight.view(-1, head_dim, weight.shape[-1])
    return torch.cat((-w[:, half:], w[:, :half]), dim=1).reshape(weight.shape)


def block_weights(block: Block) -> tuple[torch.Tensor, ...]:
    """The nine weights a FastBlock is derived from."""
    a, m = block.attn, block.mlp
    return (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, m.gate_proj.weight,
            m.up_proj.weight, m.down_proj.weight, block.attn_norm.weight, block.mlp_norm.weight)


@dataclass(frozen=True)
class FastBlock:
    """One block's weights laid out for decoding, and the block's forward (without dropout) on them.

    Each weight is (in, out), contiguous, used as x @ W: transposed copies multiply faster than
    F.linear for a few rows on CPU (MKL), and folding the RMSNorm gains and the attention
    scale into the projections removes a call each.
    """

    # (C, (2H + 3H_kv) * D), times the attention norm's gain:
    # q / sqrt(D) | k | v | rotate_half(q) / sqrt(D) | rotate_half(k)
    qkv_rot: torch.Tensor
    out: torch.Tensor  # (H * D, C)
    gate_up: torch.Tensor  # (C, 2 * d_ff), times the MLP norm's gain
    down: torch.Tensor  # (d_ff, C)
    heads: int
    kv_heads: int
    eps: float  # both norms'
    native: kernels.F32Block | None = None  # the same weights for kernels.f32_block (None: it cannot run them)

    @classmethod
    def of(cls, block: Block) -> FastBlock:
        a, m = block.attn, block.mlp
        with torch.no_grad():
            attn_gain = block.attn_norm.weight.to(a.q_proj.weight.dtype)
            q = a.q_proj.weight * a.head_dim**-0.5
            k = a.k_proj.weight
            qkv_rot = torch.cat((q, k, a.v_proj.weight, rotate_half_rows(q, a.head_dim),
                                 rotate_half_rows(k, a.head_dim))) * attn_gain
            gate_up = torch.cat((m.gate_proj.weight, m.up_proj.weight)) * block.mlp_norm.weight.to(q.dtype)
            weights = dict(qkv_rot=qkv_rot.t().contiguous(), out=a.o_proj.weight.t().contiguous(),
                           gate_up=gate_up.t().contiguous(), down=m.down_proj.weight.t().contiguous())
            shape = dict(heads=a.num_heads, kv_heads=a.kv_heads, eps=block.attn_norm.eps)
            return cls(**weights, **shape, native=kernels.f32_block_layout(**weights, **shape))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                 layer: int, pos: int) -> torch.Tensor:
        """``Block.forward`` in as few calls as it can: norm gains folded into the projections, one
        product for queries, keys, values and their rotate-half copies, rotary as one multiply-add;
        for a few float32 rows on CPU, one call (kernels.f32_block)."""
        if kernels.runs_f32_block(self.native, x, cache):
            return kernels.f32_block(self.native, x, cos, sin, cache, layer, pos)
        b, t, c = x.shape
        x = x.view(b * t, c)  # 2-D rows: products skip matmul's reshaping
        heads, kv_heads = self.heads, self.kv_heads
        rotating = heads + kv_heads  # queries and keys rotate alike
        proj = (normalize(x, self.eps) @ self.qkv_rot).view(b, t, rotating * 2 + kv_heads, -1).transpose(1, 2)
        qk = torch.addcmul(proj[:, :rotating] * cos, proj[:, rotating + kv_heads :], sin)  # (B, H + H_kv, T, D)
        values = proj[:, rotating : rotating + kv_heads]
        x = x + attend_scaled(qk[:, :heads], qk[:, heads:], values, cache, layer, pos) @ self.out
        gate, up = (normalize(x, self.eps) @ self.gate_up).chunk(2, dim=-1)
        return (x + (F.silu(gate) * up) @ self.down).view(b, t, c)


def attend_scaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
                  pos: int, scale: float = 1.0) -> torch.Tensor:
    """Causal attention without the output projection -> (B * T, H * D); scale: of the scores (1: q is scaled).

    q (B, H, T, D) attends over the cached keys/values plus k, v (B, H_kv, T, D). Few fp32
    queries (decoding, drafts, verification) use three plain calls, which cost less than SDPA's
    fixed overhead on CPU; few bf16 queries on CPU the bf16 kernel (``kernels.attention``), which
    rounds each row alike whatever the other rows; long prefills and other half precision use
    SDPA, which accumulates in fp32 (plain bf16 products round the scores and probabilities to
    bf16: 3 ulps off the plain path).
    """
    b, heads, t, d = q.shape
    if cache is not None:
        k, v = cache.write(layer, pos, k, v)
    if kernels.attends(q, k, v):  # bf16 on CPU: each row's bits whatever the other rows
        return kernels.attention(q, k, v, scale)
    if t > PLAIN_ATTENTION_MAX_QUERIES or q.dtype != torch.float32:
        y = causal_attention(q, k, v, scale=scale)
    else:  # query head h reads key/value head h // groups, as SDPA's enable_gqa does
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        scores = q.reshape(b, kv_heads, groups * t, d) @ k.transpose(-1, -2)  # (B, H_kv, G*T, S)
        if scale != 1.0:
            scores = scores * scale
        mask = causal_mask(t, k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat(groups, 1), -math.inf)
        y = (scores.softmax(-1) @ v).view(b, heads, t, d)
    return y.transpose(1, 2).reshape(b * t, -1)


@dataclass(frozen=True)
class InPlaceBlock:
    """One block's forward (without dropout) on the block's own weights: no copy, the plain path's products.

    For models whose copies would cost too much memory, where a step reads megabytes per product
    and the few extra calls of the unfolded layout cost nothing that shows. Differs from
    ``Block.forward`` in attention (plain products for a few fp32 queries, as in FastBlock) and,
    for bf16 on CPU, in the products' float32 summation order (``kernels.linear``); otherwise it
    gives the plain block's bits.
    """

    block: Block

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                 layer: int, pos: int) -> torch.Tensor:
        block, b, t, c = self.block, *x.shape
        attn, mlp = block.attn, block.mlp
        h = rms_norm(block.attn_norm, x)
        q, k, v = (kernels.linear(h, w).view(b, t, heads, attn.head_dim).transpose(1, 2) for w, heads in
                   ((attn.q_proj.weight, attn.num_heads), (attn.k_proj.weight, attn.kv_heads),
                    (attn.v_proj.weight, attn.kv_heads)))
        y = attend_scaled(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, cache, layer, pos,
                          attn.head_dim**-0.5)
        x = x + kernels.linear(y, attn.o_proj.weight).view(b, t, c)
        h = rms_norm(block.mlp_norm, x)
        gated = F.silu(kernels.linear(h, mlp.gate_proj.weight)) * kernels.linear(h, mlp.up_proj.weight)
        return x + kernels.linear(gated, mlp.down_proj.weight)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, in one kernel where the dtypes allow."""
    if x.dtype == torch.float32 == norm.weight.dtype:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)

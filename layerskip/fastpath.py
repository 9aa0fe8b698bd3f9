"""The decoding fast path: the model's blocks and heads as the same functions in fewer calls.

Decoding a token is a chain of tiny products whose fixed cost per call dominates on CPU.
``FastDecoder.of(model)`` offers ``run_blocks``, ``unembed`` and ``unembed_short`` with the
model's signatures, computed from copies of its weights laid out for a few rows at a time.
The copies follow weight changes; inside a ``decoding()`` scope each is checked only once.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from layerskip.cache import KVCache
from layerskip.model import Block, RMSNorm, Transformer, causal_attention, causal_mask, normalize

PLAIN_ATTENTION_MAX_QUERIES = 16  # above this many queries, SDPA is faster than plain products
FEW_ROWS = 16  # unembed at most this many rows on CPU through the head's transposed copy
T = TypeVar("T")

# The current `decoding()` scope (None outside one): while it lasts, weights do not change.
_DECODING_SCOPE: ContextVar[object | None] = ContextVar("layerskip_decoding_scope", default=None)


@contextmanager
def decoding() -> Iterator[None]:
    """Inference mode with the weights held fixed: the scope every decoding strategy runs in.

    Usable as ``with decoding():`` or ``@decoding()``. Inside it, each copy in a
    DerivedWeights is checked against its weights once, at first use, instead of on every
    call: decoding asks for a block's copies on every block of every token, and checking
    nine weights costs a noticeable share of a small block. Change no weight inside.
    """
    with torch.inference_mode():
        token = _DECODING_SCOPE.set(object()) if _DECODING_SCOPE.get() is None else None
        try:
            yield
        finally:
            if token is not None:
                _DECODING_SCOPE.reset(token)


def _weight_key(w: torch.Tensor) -> tuple | None:
    """Identity + version of a weight, to know when a copy derived from it is stale (None: untracked)."""
    try:
        return (w.data_ptr(), w._version, w.dtype, w.device)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class DerivedWeights:
    """Copies derived from weights for decoding (transposed, stacked, ...), rebuilt when a weight changes.

    ``get(name, sources, build)`` returns the cached ``build()`` while every weight in
    ``sources()`` keeps its identity and version, rebuilds it otherwise, and returns None when
    a weight has no version counter (made in inference mode), since staleness could then go
    unnoticed. Within one ``decoding()`` scope an entry is checked only once.
    """

    def __init__(self) -> None:
        self._entries: dict[object, tuple[tuple, object, object]] = {}  # name -> (key, copy, scope checked in)

    def get(self, name: object, sources: Callable[[], tuple[torch.Tensor, ...]], build: Callable[[], T]) -> T | None:
        scope = _DECODING_SCOPE.get()
        entry = self._entries.get(name)
        if entry is not None and scope is not None and entry[2] is scope:
            return entry[1]
        key = tuple(_weight_key(w) for w in sources())
        if None in key:
            return None
        copy = entry[1] if entry is not None and entry[0] == key else build()
        self._entries[name] = (key, copy, scope)
        return copy

    def clear(self) -> None:
        self._entries.clear()


# ----------------------------------------------------------------------------- one block


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
            return cls(qkv_rot=qkv_rot.t().contiguous(), out=a.o_proj.weight.t().contiguous(),
                       gate_up=gate_up.t().contiguous(), down=m.down_proj.weight.t().contiguous(),
                       heads=a.num_heads, kv_heads=a.kv_heads, eps=block.attn_norm.eps)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                 layer: int, pos: int) -> torch.Tensor:
        """``Block.forward`` in as few calls as it can: norm gains folded into the projections, one
        product for queries, keys, values and their rotate-half copies, rotary as one multiply-add."""
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
                  pos: int) -> torch.Tensor:
    """Causal attention of queries already scaled by 1/sqrt(D), without the output projection -> (B * T, H * D).

    q (B, H, T, D) attends over the cached keys/values plus k, v (B, H_kv, T, D). Few queries
    (decoding, drafts, verification) use three plain calls, which cost less than SDPA's fixed
    overhead on CPU; long prefills use SDPA.
    """
    b, heads, t, d = q.shape
    if cache is not None:
        k, v = cache.write(layer, pos, k, v)
    if t > PLAIN_ATTENTION_MAX_QUERIES:
        y = causal_attention(q, k, v, scale=1.0)
    else:  # query head h reads key/value head h // groups, as SDPA's enable_gqa does
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        scores = q.reshape(b, kv_heads, groups * t, d) @ k.transpose(-1, -2)  # (B, H_kv, G*T, S)
        mask = causal_mask(t, k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat(groups, 1), -math.inf)
        y = (scores.softmax(-1) @ v).view(b, heads, t, d)
    return y.transpose(1, 2).reshape(b * t, -1)


# ----------------------------------------------------------------------------- the model

_DECODERS: weakref.WeakKeyDictionary[Transformer, FastDecoder] = weakref.WeakKeyDictionary()


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, in one kernel where the dtypes allow."""
    if x.dtype == torch.float32 == norm.weight.dtype:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)


class FastDecoder:
    """A model's blocks and heads for decoding: its results up to rounding, no dropout, no gradients.

    ``FastDecoder.of(model)`` is the model's own, kept as long as the model, so the copies it
    derives outlive each generation.
    """

    @classmethod
    def of(cls, model: Transformer) -> FastDecoder:
        fast = _DECODERS.get(model)
        if fast is None:
            fast = _DECODERS[model] = cls(model)
        return fast

    def __init__(self, model: Transformer) -> None:
        self._model = weakref.ref(model)  # the model keeps its decoder alive (see `of`), not the reverse
        self.copies = DerivedWeights()  # the blocks' and the head's, and strategies' own (propagation)
        self._short_heads = DerivedWeights()
        self._ranked_by = model.token_counts  # the counts the short heads' tokens were chosen by

    @property
    def model(self) -> Transformer:
        return self._model()

    def block(self, layer: int) -> FastBlock:
        """Block `layer`'s FastBlock, rebuilt whenever one of its weights changes."""
        def build() -> FastBlock:
            return FastBlock.of(self.model.layers[layer])

        return (self.copies.get(("block", layer), lambda: block_weights(self.model.layers[layer]), build)
                or build())

    def run_blocks(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        *,
        cache: KVCache | None = None,
        pos: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``Transformer.run_blocks`` through FastBlocks."""
        cos, sin = rope if rope is not None else self.model.rotary(pos, h.shape[1])
        for layer in range(start, end):
            h = self.block(layer)(h, cos, sin, cache, layer, pos)
        return h

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``Transformer.unembed``; a few rows on CPU go through the head's transposed copy.

        Decoding unembeds one row (or k + 1) at a time, and on CPU (MKL) x @ W^T with W^T stored
        contiguously is much faster than F.linear(x, W) for a few rows of a large head.
        """
        model = self.model
        if hidden.device.type == "cpu" and hidden.numel() <= FEW_ROWS * hidden.shape[-1]:
            head = self.copies.get("head", self._head_weights, self._build_head)
            if head is not None:
                return normalize(hidden, model.norm.eps) @ head
        return model.lm_head(rms_norm(model.norm, hidden))

    def unembed_short(self, hidden: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``Transformer.unembed_short`` through a cached copy of the short head."""
        model = self.model
        if size >= model.config.vocab_size:
            return self.unembed(hidden), torch.arange(model.config.vocab_size, device=hidden.device)
        if model.token_counts is not self._ranked_by:  # new counts choose other tokens
            self._short_heads.clear()
            self._ranked_by = model.token_counts

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            ids = model.frequent_ids(size)
            with torch.no_grad():
                return ids, model.folded_head(ids).contiguous()

        ids, head = self._short_heads.get(size, self._head_weights, build) or build()
        return normalize(hidden, model.norm.eps) @ head, ids

    def _head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        return model.lm_head.weight, model.norm.weight

    def _build_head(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.folded_head().contiguous()

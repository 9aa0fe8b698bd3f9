"""A Llama-style decoder whose every layer can exit through one shared final norm + head.

Conventions (see CONVENTIONS.md):
- ``exit_layer=k`` means "after k blocks"; every exit goes through ``unembed`` (the final
  RMSNorm and the LM head), so exiting after all L blocks *is* the full forward pass.
- The cache, the position and the depth range are arguments: ``run_blocks(h, a, b,
  cache=..., pos=...)`` runs blocks [a, b) and is all that self-speculative decoding
  (draft with [0, E), verify with [E, L)) and dynamic early exit need.
- The architecture is exactly Hugging Face's ``LlamaForCausalLM`` (rotate-half rotary
  embeddings, fp32 RMSNorm, SwiGLU, no biases), so weights export one-to-one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.cache import KVCache
from layerskip.config import ModelConfig
from layerskip.errors import PromptError


PLAIN_ATTENTION_MAX_QUERIES = 16  # above this many queries, SDPA is faster than plain products
T = TypeVar("T")


def _weight_key(w: torch.Tensor) -> tuple | None:
    """Identity + version of a weight, to know when a copy derived from it is stale (None: untracked)."""
    try:
        return (w.data_ptr(), w._version, w.dtype, w.device)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


# The current `decoding()` scope (None outside one): while it lasts, weights do not change.
_DECODING_SCOPE: ContextVar[object | None] = ContextVar("layerskip_decoding_scope", default=None)


@contextmanager
def decoding() -> Iterator[None]:
    """Inference mode with the weights held fixed: the scope every decoding strategy runs in.

    Usable as ``with decoding():`` or ``@decoding()``. Inside it, each copy in a
    DerivedWeights is checked against its weights once, at first use, instead of on every
    call: decoding asks for a block's copies on every block of every token, and checking
    nine weights costs about 15 us, a tenth of a d128 block. Change no weight inside.
    """
    with torch.inference_mode():
        token = _DECODING_SCOPE.set(object()) if _DECODING_SCOPE.get() is None else None
        try:
            yield
        finally:
            if token is not None:
                _DECODING_SCOPE.reset(token)


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


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a gain, computed in fp32 and returned in x's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 == self.weight.dtype and not torch.compiler.is_compiling()
                and torch.is_inference_mode_enabled()):
            # decoding: the same numbers from one kernel (10 us instead of 15 per call here)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 as Llama does, so bf16 runs and HF export agree.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (S, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_half_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows R such that R x = rotate_half(W x) for every head: (heads * D, C) -> the same shape.

    Projecting with [W; R] gives a head's rotated copy with the projection itself, so rotary
    embedding becomes x * cos + rotated * sin with no slicing or concatenation per token.
    """
    half = head_dim // 2
    w = weight.view(-1, head_dim, weight.shape[-1])
    return torch.cat((-w[:, half:], w[:, :half]), dim=1).reshape(weight.shape)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of normalised input x (B, T, C) -> two (B, H_kv, T, D)."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C), already normalised
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        pos: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        return self.attend(q, k, v, cache, layer, pos)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
               pos: int) -> torch.Tensor:
        """Rotated queries (B, H, T, D) over the cached keys/values plus these; output projection -> (B, T, C)."""
        b, _, t, _ = q.shape
        if cache is not None:
            k, v = cache.write(layer, pos, k, v)  # keys/values of positions [0, pos + t)
        y = self.causal_sdpa(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def attend_scaled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
                      pos: int) -> torch.Tensor:
        """``attend`` for queries already scaled by 1/sqrt(D), without the output projection -> (B * T, H * D).

        Few queries (decoding, drafts, verification) use three plain calls, which cost less
        than SDPA's fixed overhead on CPU; long prefills use SDPA.
        """
        b, _, t, d = q.shape
        if cache is not None:
            k, v = cache.write(layer, pos, k, v)
        if t > PLAIN_ATTENTION_MAX_QUERIES:
            y = self.causal_sdpa(q, k, v, scale=1.0)
        else:  # query head h reads key/value head h // groups, as SDPA's enable_gqa does
            groups = self.num_heads // self.kv_heads
            scores = q.reshape(b, self.kv_heads, groups * t, d) @ k.transpose(-1, -2)  # (B, H_kv, G*T, S)
            mask = causal_mask(t, k.shape[2], q.device)
            if mask is not None:
                scores = scores.masked_fill(~mask.repeat(groups, 1), -math.inf)
            y = (scores.softmax(-1) @ v).view(b, self.num_heads, t, d)
        return y.transpose(1, 2).reshape(b * t, -1)

    def causal_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    dropout_p: float = 0.0) -> torch.Tensor:
        """SDPA of queries (B, H, T, D) at the last T of the keys' positions, each seeing keys up to its own."""
        t = q.shape[2]
        full_causal = t > 1 and k.shape[2] == t  # no cached prefix: SDPA's fast causal path
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if full_causal else causal_mask(t, k.shape[2], q.device),
            is_causal=full_causal, dropout_p=dropout_p, scale=scale, enable_gqa=self.kv_heads != self.num_heads)


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask letting the last num_queries positions see every key at or before them."""
    if num_queries == 1:
        return None  # a single newest query sees every cached key
    offset = num_keys - num_queries
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + offset
    return torch.arange(num_keys, device=device).unsqueeze(0) <= q_pos  # (T, S)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.derived = DerivedWeights()  # DecodingWeights, see decoding_weights
        self.eps = cfg.norm_eps  # both norms', for decode

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        pos: int = 0,
    ) -> torch.Tensor:
        # (torch.compile cannot trace is_inference_mode_enabled; compiled blocks are for training)
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled() and not self.training:
            return self.decode(x, cos, sin, cache, layer, pos)
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, cache, layer, pos))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))

    def decoding_weights(self) -> DecodingWeights:
        """This block's DecodingWeights, rebuilt whenever one of its weights changes."""
        return (self.derived.get("decoding", self._decoding_sources, self._build_decoding_weights)
                or self._build_decoding_weights())

    def _decoding_sources(self) -> tuple[torch.Tensor, ...]:
        a, m = self.attn, self.mlp
        return (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, m.gate_proj.weight,
                m.up_proj.weight, m.down_proj.weight, self.attn_norm.weight, self.mlp_norm.weight)

    def _build_decoding_weights(self) -> DecodingWeights:
        a, m = self.attn, self.mlp
        with torch.no_grad():
            attn_gain = self.attn_norm.weight.to(a.q_proj.weight.dtype)
            q = a.q_proj.weight * a.head_dim**-0.5
            k = a.k_proj.weight
            qkv_rot = torch.cat((q, k, a.v_proj.weight, rotate_half_rows(q, a.head_dim),
                                 rotate_half_rows(k, a.head_dim))) * attn_gain
            gate_up = torch.cat((m.gate_proj.weight, m.up_proj.weight)) * self.mlp_norm.weight.to(q.dtype)
            return DecodingWeights(
                qkv_rot=qkv_rot.t().contiguous(),
                out=a.o_proj.weight.t().contiguous(),
                gate_up=gate_up.t().contiguous(),
                down=m.down_proj.weight.t().contiguous(),
            )

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
               layer: int, pos: int) -> torch.Tensor:
        """The block's forward without dropout, from DecodingWeights: the same function, fewer calls.

        Decoding a token is a chain of tiny products whose fixed cost per call dominates on CPU
        (the weights' arithmetic is about a quarter of a d128 step), so this path makes as few calls as
        it can: norm gains folded into the projections, one product for queries, keys, values
        and their rotate-half copies, rotary as one multiply-add, and plain attention for few
        queries.
        """
        w = self.decoding_weights()
        b, t, c = x.shape
        x = x.view(b * t, c)  # 2-D rows: products skip matmul's reshaping
        heads, kv_heads = self.attn.num_heads, self.attn.kv_heads
        rotating = heads + kv_heads  # queries and keys rotate alike
        proj = (normalize(x, self.eps) @ w.qkv_rot).view(b, t, rotating * 2 + kv_heads, -1).transpose(1, 2)
        qk = torch.addcmul(proj[:, :rotating] * cos, proj[:, rotating + kv_heads :], sin)  # (B, H + H_kv, T, D)
        values = proj[:, rotating : rotating + kv_heads]
        x = x + self.attn.attend_scaled(qk[:, :heads], qk[:, heads:], values, cache, layer, pos) @ w.out
        gate, up = (normalize(x, self.eps) @ w.gate_up).chunk(2, dim=-1)
        return (x + (F.silu(gate) * up) @ w.down).view(b, t, c)


@dataclass(frozen=True)
class DecodingWeights:
    """One block's weights laid out for ``Block.decode``: each (in, out), contiguous, used as x @ W.

    Transposed copies multiply faster than F.linear for a few rows on CPU (MKL), and folding
    the RMSNorm gains and the attention scale into the projections removes a call each.
    """

    # (C, (2H + 3H_kv) * D), times the attention norm's gain:
    # q / sqrt(D) | k | v | rotate_half(q) / sqrt(D) | rotate_half(k)
    qkv_rot: torch.Tensor
    out: torch.Tensor  # (H * D, C)
    gate_up: torch.Tensor  # (C, 2 * d_ff), times the MLP norm's gain
    down: torch.Tensor  # (d_ff, C)


@dataclass
class ModelOutput:
    """What ``Transformer.forward`` returns, whatever was asked for."""

    hidden: torch.Tensor  # (B, T, C) after `exit_layer` blocks, before the final norm
    logits: torch.Tensor | None  # (B, T, V) unembedding of `hidden`, unless skipped
    exit_layer: int
    exit_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> hidden after k blocks


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.derived = DerivedWeights()  # transposed (short) heads for decoding, see unembed(_short)
        # Training-split count of each token id (None: unknown); ranks the vocabulary for
        # unembed_short. Checkpoints carry it; it is not a weight.
        self.token_counts: torch.Tensor | None = None
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init for projections that write into the residual stream.
        for block in self.layers:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty cache on the model's device and dtype."""
        cfg = self.config
        weight = self.embed_tokens.weight
        return KVCache(
            cfg.num_layers,
            batch_size,
            cfg.kv_heads,
            max_len or cfg.max_seq_len,
            cfg.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, C)."""
        return self.embed_dropout(self.embed_tokens(idx))

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The one shared exit: final RMSNorm + LM head, (..., C) -> (..., V)."""
        if hidden.device.type == "cpu" and torch.is_inference_mode_enabled() and hidden.numel() <= 16 * hidden.shape[-1]:
            head = self._decoding_head()
            if head is not None:  # the same function as lm_head(norm(h)), faster for a few rows on CPU
                return normalize(hidden, self.norm.eps) @ head
        return self.lm_head(self.norm(hidden))

    def _decoding_head(self) -> torch.Tensor | None:
        """The LM head times the final norm's gain as a contiguous (C, V) copy, rebuilt when either changes.

        Decoding unembeds one row (or k + 1) at a time. On CPU (MKL), x @ W^T with W^T stored
        contiguously measured about 2x faster than F.linear(x, W) for the 8192 x 128 head, which
        is 1.2x on a whole autoregressive step and more on self-speculative drafts.
        """
        return self.derived.get("head", self._head_sources, lambda: self._folded_head(None).contiguous())

    def _head_sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm_head.weight, self.norm.weight

    def _folded_head(self, ids: torch.Tensor | None) -> torch.Tensor:
        """(C, V or len(ids)): the head's rows (all, or those of ids) times the final norm's gain, transposed."""
        w, gain = self._head_sources()
        return (w * gain if ids is None else w[ids] * gain).t()

    # -- the short head: the most frequent tokens only ----------------------------------

    def set_token_counts(self, counts: torch.Tensor | None) -> None:
        """Record training-split token counts (V,), which rank the vocabulary for unembed_short."""
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.long).flatten()
            if counts.numel() != self.config.vocab_size:
                raise ValueError(f"token counts cover {counts.numel()} ids, the vocabulary has {self.config.vocab_size}")
        self.token_counts = counts
        self.derived.clear()  # the short heads' tokens follow the counts

    def frequent_ids(self, size: int) -> torch.Tensor:
        """Sorted ids of the `size` most frequent tokens (without counts: ids 0 .. size-1)."""
        vocab = self.config.vocab_size
        if not (isinstance(size, int) and 1 <= size <= vocab):
            raise ValueError(f"a short head holds 1..{vocab} tokens, got {size!r}")
        if self.token_counts is None:
            ids = torch.arange(size)
        else:  # a stable sort: equal counts keep id order
            ids = torch.argsort(-self.token_counts, stable=True)[:size].sort().values
        return ids.to(self.lm_head.weight.device)

    def unembed_short(self, hidden: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (..., size), ids (size,)): the shared exit restricted to the `size` most frequent tokens.

        Column i of the logits is token ids[i]; they equal ``unembed(hidden)[..., ids]`` up to
        rounding, at size/V of the head's cost (size >= V: the full head, ids 0..V-1). With
        V = 8192 at d_model 128 the full head reads four blocks' worth of weights per token, so
        drafts and early exits that only need a likely token, not the whole distribution, use
        this instead.
        """
        if size >= self.config.vocab_size:
            return self.unembed(hidden), torch.arange(self.config.vocab_size, device=hidden.device)
        def short_head() -> tuple[torch.Tensor, torch.Tensor]:
            ids = self.frequent_ids(size)
            return ids, self._folded_head(ids)

        # a copy made in inference mode cannot enter autograd, so only decoding caches it
        cached = None
        if torch.is_inference_mode_enabled():
            cached = self.derived.get(("short", size), self._head_sources,
                                      lambda: tuple(x.contiguous() for x in short_head()))
        ids, head_t = cached or short_head()
        return normalize(hidden, self.norm.eps) @ head_t, ids

    def rotary(self, pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions [pos, pos + length)."""
        end = pos + length
        if end > self.config.max_seq_len:
            raise PromptError(
                f"position {end - 1} is beyond the model's context of {self.config.max_seq_len} "
                "tokens; use a shorter prompt or fewer new tokens"
            )
        return self.rope_cos[pos:end], self.rope_sin[pos:end]

    def run_block(
        self,
        layer: int,
        h: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        pos: int = 0,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Block `layer` on h (B, T, C); `keep` (B,) bool skips the block for False rows.

        Skipped rows cost no compute: only the kept rows go through the block.
        """
        block = self.layers[layer]
        if keep is None:
            return block(h, *rope, cache, layer, pos)
        rows = keep.nonzero().squeeze(1)
        if rows.numel() == h.shape[0]:
            return block(h, *rope, cache, layer, pos)
        if rows.numel() == 0:
            return h
        if cache is not None:
            raise ValueError("per-sample layer skipping is a training feature and cannot use a KV cache")
        return h.index_copy(0, rows, block(h.index_select(0, rows), *rope))

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
        """Blocks [start, end) on hidden states h (B, T, C) at positions [pos, pos + T).

        rope: ``rotary(pos, T)`` when the caller already has it (DEE runs one block at a time).
        """
        cos, sin = rope if rope is not None else self.rotary(pos, h.shape[1])
        if torch.is_inference_mode_enabled() and not self.training:
            blocks = list(self.layers)  # Block.decode directly: module calls cost ~20 us per block here
            for layer in range(start, end):
                h = blocks[layer].decode(h, cos, sin, cache, layer, pos)
            return h
        for layer in range(start, end):
            h = self.layers[layer](h, cos, sin, cache, layer, pos)
        return h

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        pos: int = 0,
        exit_layer: int | None = None,
        exits: Collection[int] = (),
        layer_keep: torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Tokens idx (B, T) at positions [pos, pos + T) through blocks [0, exit_layer).

        exits: also return the hidden state after k blocks for each k in it (1..exit_layer),
            so several exits share one pass through the trunk.
        layer_keep: (L, B) bool, False skips block l for sample b (layer dropout).
        """
        num_blocks = self.num_layers if exit_layer is None else exit_layer
        if not 1 <= num_blocks <= self.num_layers:
            raise ValueError(f"exit_layer must be in 1..{self.num_layers}, got {exit_layer}")
        bad_exits = [k for k in exits if not 1 <= k <= num_blocks]
        if bad_exits:
            raise ValueError(f"exits {bad_exits} are outside 1..{num_blocks}")
        rope = self.rotary(pos, idx.shape[1])
        h = self.embed(idx)
        exit_hidden: dict[int, torch.Tensor] = {}
        for layer in range(num_blocks):
            keep = None if layer_keep is None else layer_keep[layer]
            h = self.run_block(layer, h, rope=rope, cache=cache, pos=pos, keep=keep)
            if layer + 1 in exits:
                exit_hidden[layer + 1] = h
        logits = self.unembed(h) if compute_logits else None
        return ModelOutput(hidden=h, logits=logits, exit_layer=num_blocks, exit_hidden=exit_hidden)

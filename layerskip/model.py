"""A Llama-style decoder whose every layer can exit through one shared final norm + head.

- ``exit_layer=k`` means "after k blocks"; every exit goes through ``unembed`` (the final
  RMSNorm and the LM head), so exiting after all L blocks *is* the full forward pass.
- The cache, the position and the depth range are arguments: ``run_blocks(h, a, b,
  cache=..., pos=...)`` runs blocks [a, b) and is all that self-speculative decoding
  (draft with [0, E), verify with [E, L)) and dynamic early exit need.
- The architecture is exactly Hugging Face's ``LlamaForCausalLM`` (rotate-half rotary
  embeddings, fp32 RMSNorm, SwiGLU, no biases), so weights export one-to-one.

This is the plain path, whatever mode torch is in; decoding strategies run the same
functions from copies laid out for speed through ``layerskip.fastpath``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layerskip.cache import KVCache
from layerskip.config import ModelConfig, RopeScaling
from layerskip.errors import PromptError


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
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's arithmetic with a given gain (a detached one, for a loss that must not train it)."""
    # Normalise in fp32 as Llama does, so bf16 runs and HF export agree.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return gain * x32.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float,
                  scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim) in the rotate-half layout, in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    inv_freq = scaled_frequencies(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (S, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return angles.cos(), angles.sin()


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotary inverse frequencies (D/2,) after `scaling` (see RopeScaling), computed as transformers does."""
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - low) / (high - low)  # 0 at the long end of the blended band, 1 at the short
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    kept_or_blended = torch.where(wavelength < context / high, inv_freq, blended)
    return torch.where(wavelength > context / low, inv_freq / factor, kept_or_blended)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask letting the last num_queries positions see every key at or before them."""
    if num_queries == 1:
        return None  # a single newest query sees every cached key
    offset = num_keys - num_queries
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + offset
    return torch.arange(num_keys, device=device).unsqueeze(0) <= q_pos  # (T, S)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA of queries (B, H, T, D) at the last T of the keys' positions, each seeing keys up to its own.

    Keys and values (B, H_kv, S, D) may have fewer heads: query head h reads head h // (H / H_kv).
    """
    t = q.shape[2]
    full_causal = t > 1 and k.shape[2] == t  # no cached prefix: SDPA's fast causal path
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if full_causal else causal_mask(t, k.shape[2], q.device),
        is_causal=full_causal, dropout_p=dropout_p, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


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
        if cache is not None:
            k, v = cache.write(layer, pos, k, v)  # keys/values of positions [0, pos + t)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, cache, layer, pos))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


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
        # Training-split count of each token id (None: unknown); ranks the vocabulary for
        # unembed_short. Checkpoints carry it; it is not a weight.
        self.token_counts: torch.Tensor | None = None
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init for projections that write into the residual stream.
        for block in self.layers:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def reset_rotary(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Recompute the rotary tables (in fp32, then cast) onto `device` in `dtype`.

        They are not weights: a model built on the meta device and given loaded weights needs them made.
        """
        cfg = self.config
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)

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
        return KVCache(cfg.num_layers, batch_size, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                       dtype=weight.dtype, device=weight.device)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, C)."""
        return self.embed_dropout(self.embed_tokens(idx))

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The one shared exit: final RMSNorm + LM head, (..., C) -> (..., V)."""
        return self.lm_head(self.norm(hidden))

    # -- the short head: the most frequent tokens only ----------------------------------

    def set_token_counts(self, counts: torch.Tensor | None) -> None:
        """Record training-split token counts (V,), which rank the vocabulary for unembed_short."""
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.long).flatten()
            if counts.numel() != self.config.vocab_size:
                raise ValueError(f"token counts cover {counts.numel()} ids, the vocabulary has {self.config.vocab_size}")
        self.token_counts = counts

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

    def folded_head(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(C, V or len(ids)): the head's rows (all, or those of ids) times the final norm's gain, transposed.

        ``normalize(h, norm.eps) @ folded_head()`` is ``unembed(h)`` up to rounding.
        """
        w, gain = self.lm_head.weight, self.norm.weight
        return (w * gain if ids is None else w[ids] * gain).t()

    def unembed_short(self, hidden: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (..., size), ids (size,)): the shared exit restricted to the `size` most frequent tokens.

        Column i of the logits is token ids[i]; they equal ``unembed(hidden)[..., ids]`` up to
        rounding, at size/V of the head's cost (size >= V: the full head, ids 0..V-1). A small
        model's head can cost several blocks, so drafts and early exits that only need a likely
        token, not the whole distribution, use this instead.
        """
        if size >= self.config.vocab_size:
            return self.unembed(hidden), torch.arange(self.config.vocab_size, device=hidden.device)
        ids = self.frequent_ids(size)
        return normalize(hidden, self.norm.eps) @ self.folded_head(ids), ids

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

"""A key/value cache written by position, one slot per layer.

The caller owns the cache and passes it to the model; the model never advances it on
its own. Each layer keeps its own valid length, because early-exit decoding fills layers
unevenly: a self-speculative draft writes only the first E layers, and verification
fills the rest. Writing T entries at position ``pos`` makes ``pos + T`` that layer's
length, so anything written beyond it before is discarded, and rolling back drafted
tokens is just ``truncate(n)``.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values: ``k[layer]`` has shape (B, H_kv, max_len, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views: fewer calls per write
        self.lengths = [0] * num_layers  # valid positions per layer

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) at positions [pos, pos+T) and return keys/values [0, pos+T)."""
        end = self._check_write(range(layer, layer + 1), pos, k.shape[2])
        keys, values = self._layers[layer]
        keys.narrow(2, pos, end - pos).copy_(k)
        values.narrow(2, pos, end - pos).copy_(v)
        self.lengths[layer] = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def reserve(self, layer: int, pos: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole key/value buffers (B, H_kv, max_len, D), positions [pos, pos+t) counted as
        written: for a kernel that writes them itself (layerskip.kernels.f32_block)."""
        self.lengths[layer] = self._check_write(range(layer, layer + 1), pos, t)
        return self._layers[layer]

    def reserve_layers(self, layers: range, pos: int, t: int) -> None:
        """Count positions [pos, pos+t) of these layers as written, by a kernel that writes them itself
        (layerskip.kernels.f32_decode); refuses, before anything is written, what ``write`` refuses."""
        end = self._check_write(layers, pos, t)
        for layer in layers:
            self.lengths[layer] = end

    def write_layers(self, start: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (L - start, B, H_kv, T, D) for layers [start, L) at positions [pos, pos+T) in one copy each."""
        end = self._check_write(range(start, self.num_layers), pos, k.shape[3])
        self.k[start:].narrow(3, pos, end - pos).copy_(k)
        self.v[start:].narrow(3, pos, end - pos).copy_(v)
        self.lengths[start:] = [end] * (self.num_layers - start)

    def _check_write(self, layers: range, pos: int, t: int) -> int:
        """The end of a write of t positions at pos into these layers; refuses gaps and overflow."""
        for layer in layers:
            if pos > self.lengths[layer]:
                raise ValueError(
                    f"layer {layer} cache holds {self.lengths[layer]} positions; cannot write at {pos} "
                    "(positions must be written without gaps)"
                )
        if pos + t > self.max_len:
            raise ValueError(f"cache holds at most {self.max_len} positions; cannot write up to {pos + t}")
        return pos + t

    def truncate(self, length: int, layers: range | None = None) -> None:
        """Forget every position >= length (in the given layers, default all)."""
        for layer in layers if layers is not None else range(self.num_layers):
            self.lengths[layer] = min(self.lengths[layer], length)

    def reset(self) -> None:
        self.truncate(0)

"""The order in which a run reads the train split: a pure function of (seed, epoch, step)."""

from __future__ import annotations

import numpy as np
import torch

from layerskip.errors import ConfigError


class BatchOrder:
    """Which windows of the train split make up each batch: a pure function of (seed, epoch).

    Each epoch shifts the window grid by a random offset and shuffles the windows; a rank
    of `world` takes its own slice of every global batch.
    """

    def __init__(self, num_tokens: int, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.num_tokens, self.seq_len, self.batch_size = num_tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.steps_per_epoch = (num_tokens - 1 - seq_len) // seq_len // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the train split has {num_tokens:,} tokens, too few for one batch of {batch_size} x {seq_len}; "
                "lower --batch_size or --seq_len"
            )
        self._epoch, self._starts = -1, np.empty(0, dtype=np.int64)

    def starts(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
            n = (self.num_tokens - 1 - offset) // self.seq_len
            perm = torch.randperm(n, generator=g).numpy()
            self._epoch, self._starts = epoch, offset + perm.astype(np.int64) * self.seq_len
        return self._starts

    def batch(self, tokens: np.ndarray, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B / world, T), of global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        starts = self.starts(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        per_rank = self.batch_size // self.world
        starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        rows = np.stack([tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

"""What one training step computes and draws.

The step's plan (enabled exits, their weights, per-block skip probabilities), its random
draws (each from its own seed, so a run is reproducible and resumable at any step), and
``ExitLossModel``: the trunk plus the weighted early-exit loss (with self-distillation when
asked) in one forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from layerskip.losses import (
    chunk_distill_and_grads,
    chunk_nll_and_grads,
    distill_exit_loss,
    enabled_exits,
    exit_loss,
    exit_weights,
    focus_weights,
    layer_dropout_probs,
    sample_layer_keep,
)
from layerskip.model import Transformer, rms_norm
from layerskip.training.config import TrainConfig

# Random streams of a step besides nn.Dropout's, whose stream is the rank.
LAYER_SKIP_STREAM = -1
EARLY_POSITIONS_STREAM = -2


@dataclass
class StepStats:
    loss: float
    exits: list[int]
    exit_losses: list[float]
    lr: float
    grad_norm: float | None
    seconds: float
    exit_kl: list[float] = field(default_factory=list)  # self-distillation: each early exit's mean KL


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_plan(cfg: TrainConfig, step: int, total_steps: int) -> tuple[list[int], list[float], list[float]]:
    """(enabled exits, their weights, per-block skip probabilities) at `step`."""
    L = cfg.num_layers
    e_scale = early_exit_scale_at(cfg, step, total_steps)
    if e_scale == 0:
        exits = [L]
    else:
        exits = enabled_exits(cfg.early_exit_curriculum, step, L, rotation=cfg.early_exit_rotation,
                              gradual_steps=cfg.early_exit_gradual_steps or total_steps)
        if cfg.early_exit_layers is not None:
            exits = [k for k in exits if k == L or k in cfg.early_exit_layers]
    weights = exit_weights(exits, L, e_scale, cfg.early_exit_weighting)
    probs = layer_dropout_probs(L, cfg.max_skip_prob, cfg.layer_dropout_schedule, step=step,
                                total_steps=total_steps, ramp=cfg.layer_dropout_ramp)
    return exits, weights, probs


def early_exit_scale_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The early-exit loss scale at `step`: early_exit_scale, moving linearly to early_exit_scale_end
    (when set) by the schedule's last step, as the LR's cosine does."""
    if cfg.early_exit_scale_end is None:
        return cfg.early_exit_scale
    progress = min(max(step, 0) / max(total_steps - 1, 1), 1.0)
    return cfg.early_exit_scale + (cfg.early_exit_scale_end - cfg.early_exit_scale) * progress


def step_seed(seed: int, step: int, stream: int) -> int:
    """Independent seeds per (seed, step, stream): dropout (stream = rank), layer skipping
    (LAYER_SKIP_STREAM) and the early-exit loss positions (EARLY_POSITIONS_STREAM)."""
    return ((seed * 1_000_003 + step) * 1_009 + stream + 7) % (2**62)


def layer_keep(cfg: TrainConfig, step: int, probs: list[float], rows: slice) -> torch.Tensor | None:
    """(L, rows) bool: which blocks each of this process's samples runs (None: no layer dropout).

    Drawn for the global batch, then sliced, so processes under torchrun reproduce one process.
    """
    if not cfg.max_skip_prob > 0:
        return None
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, LAYER_SKIP_STREAM))
    return sample_layer_keep(probs, cfg.batch_size, generator)[:, rows]


def early_positions(cfg: TrainConfig, step: int, rows: slice) -> torch.Tensor | None:
    """Flat token indices of this process's rows that the early exits' loss uses (None: every token).

    Drawn for the global batch like the skip mask.
    """
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, EARLY_POSITIONS_STREAM))
    positions = sample_early_positions(cfg.batch_size, cfg.seq_len, cfg.early_exit_tokens, generator)
    if positions is None:
        return None
    return flat_positions(positions[rows], cfg.seq_len)


def sample_early_positions(batch_size: int, seq_len: int, fraction: float,
                           generator: torch.Generator) -> torch.Tensor | None:
    """(B, m) sorted random positions in each sequence, m = round(fraction * seq_len) (None: all).

    The early exits' loss is an auxiliary term; estimating it on a random quarter of the
    tokens costs a quarter of their LM-head work, which dominates a small model's step. The
    same count in every row keeps the mean over a rank's rows equal to the global mean's
    share, so processes under torchrun reproduce one process.
    """
    if fraction >= 1.0:
        return None
    count = max(1, round(fraction * seq_len))
    return torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :count].sort(dim=1).values


def flat_positions(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, m) positions within rows -> (B*m,) indices into the flattened (B*T) tokens."""
    offsets = torch.arange(rows.shape[0]).unsqueeze(1) * seq_len
    return (rows + offsets).flatten()


class ExitLosses(NamedTuple):
    loss: torch.Tensor  # the weighted loss, the one to differentiate
    exit_nll: torch.Tensor  # (E,) each enabled exit's mean NLL, detached
    exit_kl: torch.Tensor  # (E-1,) each early exit's mean KL to the last layer; (0,) without distillation


class ExitLossModel(nn.Module):
    """Trunk + weighted early-exit loss in one forward, so DDP sees every parameter's use."""

    def __init__(self, model: Transformer, chunk_size: int, *, compile_loss: bool = False, distill: float = 0.0,
                 temperature: float = 1.0, trains_head: bool = True, focus: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.distill, self.temperature = distill, temperature
        self.trains_head = trains_head
        self.focus = focus
        # the head + loss of one chunk, compiled on its own (like each block) when asked
        self.chunk_fn = torch.compile(chunk_nll_and_grads, dynamic=True) if compile_loss else chunk_nll_and_grads
        self.distill_fn = (torch.compile(chunk_distill_and_grads, dynamic=True) if compile_loss and distill > 0
                           else chunk_distill_and_grads)

    def forward(
        self,
        idx: torch.Tensor,  # (B, T)
        targets: torch.Tensor,  # (B, T)
        exits: list[int],
        weights: list[float],
        keep: torch.Tensor | None,  # (L, B) bool
        early_positions: torch.Tensor | None = None,  # (n,) flat token indices for the early exits
    ) -> ExitLosses:
        """The last exit's loss over every token, the earlier ones' over `early_positions` only when
        given (an unbiased, cheaper estimate of their loss), distilled from the last exit when asked,
        each token weighted by the last exit's confidence when focus > 0."""
        out = self.model(idx, exits=exits, layer_keep=keep, compute_logits=False)
        flat_targets = targets.flatten()
        no_kl = torch.zeros(0, device=flat_targets.device)
        head = self.model.lm_head.weight
        if len(exits) == 1 or (early_positions is None and not self.distill and self.trains_head and not self.focus):
            hidden = torch.stack([out.exit_hidden[k] for k in exits])  # (E, B, T, C)
            normed = self.model.norm(hidden).flatten(1, 2)  # (E, B*T, C)
            return ExitLosses(*self._loss(normed, head, flat_targets, weights), no_kl)
        pick = (lambda t: t) if early_positions is None else (lambda t: t.index_select(0, early_positions))
        early = torch.stack([pick(out.exit_hidden[k].flatten(0, 1)) for k in exits[:-1]])  # (E-1, n, C)
        last = self.model.norm(out.exit_hidden[exits[-1]]).flatten(0, 1)  # (B*T, C)
        early_normed, early_head = self._early_head(early)
        early_targets, teacher = pick(flat_targets), pick(last)
        token_weights = (focus_weights(teacher, head, early_targets, self.focus, self.chunk_size)
                         if self.focus else None)
        if self.distill:
            early_loss, early_nll, kl = distill_exit_loss(
                early_normed, early_head, early_targets, teacher, weights[:-1],
                distill=self.distill, temperature=self.temperature, chunk_size=self.chunk_size,
                chunk_fn=self.distill_fn, token_weights=token_weights)
        else:
            (early_loss, early_nll), kl = self._loss(early_normed, early_head, early_targets, weights[:-1],
                                                     token_weights), no_kl
        last_loss, last_nll = self._loss(last.unsqueeze(0), head, flat_targets, weights[-1:])
        return ExitLosses(early_loss + last_loss, torch.cat([early_nll, last_nll]), kl)

    def _early_head(self, early: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the early exits' normed hidden states, the head weight their loss reads): with
        trains_head False, the final norm's gain and the head are constants to that loss."""
        norm, head = self.model.norm, self.model.lm_head.weight
        if self.trains_head:
            return norm(early), head
        return rms_norm(early, norm.weight.detach(), norm.eps), head.detach()

    def _loss(self, normed: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, weights: list[float],
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return exit_loss(normed, head, targets, weights, chunk_size=self.chunk_size, chunk_fn=self.chunk_fn,
                         token_weights=token_weights)

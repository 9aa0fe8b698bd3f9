"""The optimizer of a run: AdamW alone, or Muon for the blocks' matrices and AdamW for the rest."""

from __future__ import annotations

from typing import Any

import torch

from layerskip.errors import ConfigError
from layerskip.model import Transformer
from layerskip.training.config import TrainConfig


class OptimizerGroup:
    """Several optimizers stepped as one: the Trainer sets the LR of every param group, steps,
    zeroes and checkpoints them together."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ConfigError(f"the saved optimizer state holds {sorted(state)}, this run uses "
                              f"{sorted(self.optimizers)}; resume with the optimizer the run started with")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer | OptimizerGroup:
    """AdamW, weight decay on matrices only; the fused kernel where there is one (on CPU the
    per-parameter one pays thread start-up on each of hundreds of small ops).

    With ``optimizer="muon"``, the blocks' matrices go to torch's Muon instead, its update
    scaled to AdamW's RMS ("match_rms_adamw") so the same LR and weight decay apply; the
    embedding (tied to the head) and the norms stay with AdamW, as Muon's authors advise.
    """
    block_matrices = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    decay, no_decay, muon = [], [], []
    for p in model.parameters():
        if cfg.optimizer == "muon" and id(p) in block_matrices:
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = model.embed_tokens.weight.device.type in ("cpu", "cuda")
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused or None)
    if cfg.optimizer == "adamw":
        return adamw
    return OptimizerGroup({
        "adamw": adamw,
        "muon": torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
    })

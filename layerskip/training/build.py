"""Building what a run trains: the seeded model (or the resumed one), compiled block by block,
wrapped with its loss (and in DDP under torchrun).

Never compile the whole model: while the exit set changed between steps that silently dropped
exit losses on torch 2.13 CPU; per-block compilation does not, and a test checks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from layerskip.model import Transformer
from layerskip.training.config import TrainConfig
from layerskip.training.distributed import DistInfo
from layerskip.training.step import ExitLossModel


def build_model(cfg: TrainConfig, corpus: Any, device: torch.device, resume_from: Any = None) -> Transformer:
    """The model in train mode on `device`: seeded from cfg.seed, with the weights of the
    checkpoint `resume_from` when given."""
    torch.manual_seed(cfg.seed)
    vocab = corpus.tokenizer.vocab_size
    model = Transformer(cfg.model_config(vocab))
    # checkpoints carry the training split's token counts (they rank the short decoding head)
    model.set_token_counts(torch.from_numpy(np.bincount(corpus.tokens["train"], minlength=vocab)))
    if resume_from is not None:
        model.load_state_dict(resume_from.model.state_dict())
    model.to(device).train()
    return model


def compile_blocks(model: Transformer) -> None:
    """Compile each block on its own (never the whole model: see the module docstring)."""
    from torch import _dynamo

    # one compiled variant per block, train and eval mode: more than the default limit
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    for block in model.layers:
        block.compile(dynamic=True)


def training_module(model: Transformer, cfg: TrainConfig, dist: DistInfo, device: torch.device) -> nn.Module:
    """What a step calls: the model with its early-exit loss, in DDP when there are several processes."""
    module: nn.Module = ExitLossModel(model, cfg.loss_chunk, compile_loss=cfg.compile, distill=cfg.early_exit_distill,
                                      temperature=cfg.early_exit_distill_temperature)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, find_unused_parameters=cfg.max_skip_prob > 0,
                                         device_ids=[device.index] if device.type == "cuda" else None)
    return module

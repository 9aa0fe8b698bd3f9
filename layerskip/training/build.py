"""Building what a run trains: the seeded model (or the resumed one), compiled block by block,
wrapped with its loss (and in DDP under torchrun).

Never compile the whole model: while the exit set changed between steps that silently dropped
exit losses on torch 2.13 CPU; per-block compilation does not, and a test checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from layerskip.model import Transformer
from layerskip.training.config import TrainConfig
from layerskip.training.distributed import DistInfo
from layerskip.training.step import ExitLossModel


def build_model(cfg: TrainConfig, corpus: Any, device: torch.device, source: Any = None) -> Transformer:
    """The model in train mode on `device`: seeded from cfg.seed, or with the shape, weights and
    token counts of the checkpoint `source` (the one resumed, or the one continual training starts from)."""
    torch.manual_seed(cfg.seed)
    vocab = corpus.tokenizer.vocab_size
    # a source's own config: an imported model may set what TrainConfig does not (rope_theta, kv heads, ...)
    config = cfg.model_config(vocab) if source is None else dataclasses.replace(source.model_config,
                                                                                 dropout=cfg.dropout)
    model = Transformer(config)
    # checkpoints carry the training split's token counts (they rank the short decoding head)
    counts = None if source is None else source.model.token_counts
    model.set_token_counts(counts.cpu() if counts is not None else
                           torch.from_numpy(np.bincount(corpus.tokens["train"], minlength=vocab)))
    if source is not None:
        model.load_state_dict(source.model.state_dict())
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
                                      temperature=cfg.early_exit_distill_temperature,
                                      trains_head=cfg.early_exit_trains_head, focus=cfg.early_exit_focus)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, find_unused_parameters=cfg.max_skip_prob > 0,
                                         device_ids=[device.index] if device.type == "cuda" else None)
    return module

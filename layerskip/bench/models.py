"""Models and prompts for the scripts in benchmarks/: a checkpoint, or a random model (the default
shape or any config, in any dtype), optionally built as the best case for self-speculative decoding.

Every script gets its prompts from BenchModel.prompts, so they decode what `layerskip bench` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from layerskip.bench.prompts import paragraph_prompts, random_prompts
from layerskip.checkpoint import Checkpoint, load_checkpoint
from layerskip.config import ModelConfig
from layerskip.model import Transformer, rotary_tables


@dataclass
class BenchModel:
    model: Transformer
    checkpoint: Checkpoint | None = None  # None: random weights, no tokenizer

    def prompts(self, num_prompts: int, prompt_tokens: int, seed: int = 0,
                data_dir: str | Path | None = None) -> list[list[int]]:
        """`layerskip bench`'s prompts (test-split paragraphs) as token ids; random ids without a tokenizer."""
        if self.checkpoint is None:
            return random_prompts(self.model.config.vocab_size, num_prompts, prompt_tokens, seed)
        return paragraph_prompts(self.checkpoint.tokenizer, num_prompts, prompt_tokens, seed, data_dir)

    @property
    def prompt_source(self) -> str:
        if self.checkpoint is None:
            return "random token ids"
        return "WikiText-2 test paragraphs chosen as `layerskip bench` does (seeded), first prompt tokens"


def load_model(checkpoint: str | Path | None = None, *, seed: int = 0, best_case_after: int | None = None,
               residual_scale: float = 0.0) -> BenchModel:
    """The checkpoint (on the CPU, in eval mode), or without one a random default-shape model.

    best_case_after=E (random model only): see best_case.
    """
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        return BenchModel(ckpt.model.eval(), ckpt)
    model = random_model(seed)
    if best_case_after is not None:
        best_case(model, best_case_after, residual_scale)
    return BenchModel(model)


def random_model(seed: int = 0, config: ModelConfig | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """Random weights (seeded) of the default shape, or of config; no dropout, eval mode.

    dtype (other than fp32): built on the meta device and materialised in that dtype, so a
    large shape never holds an fp32 copy (the Llama 2 7B shape is 13.5 GB in bf16, 27 GB in
    fp32); the same distribution as the fp32 initialisation, other draws.
    """
    if dtype is None or dtype == torch.float32:
        torch.manual_seed(seed)
        return Transformer(config or ModelConfig(dropout=0.0)).eval()
    cfg = config or ModelConfig(dropout=0.0)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty gives every parameter its own storage; tie them again
        model.lm_head.weight = model.embed_tokens.weight
    _initialise(model, seed)
    return model.eval()


@torch.no_grad()
def _initialise(model: Transformer, seed: int) -> None:
    """Transformer's initialisation, in place in the parameters' own dtype; the rotary tables too."""
    cfg, generator = model.config, torch.Generator().manual_seed(seed)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2's scaled init, as Transformer
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.init_std
            param.normal_(0.0, std, generator=generator)
    cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)


@torch.no_grad()
def best_case(model: Transformer, draft_layer: int, scale: float = 0.0) -> Transformer:
    """Switch off every block after the first draft_layer: scale the output projections through
    which it writes to the residual stream (attention's o_proj, the MLP's down_proj) by scale.

    At 0 those blocks add nothing, so an exit after draft_layer predicts what the full model
    does and every draft is accepted at the full compute cost: the ceiling of SSD's speed-up.
    A small scale (e.g. 0.05) makes some drafts fail, a stand-in for intermediate acceptance.
    """
    for block in model.layers[draft_layer:]:
        block.attn.o_proj.weight.mul_(scale)
        block.mlp.down_proj.weight.mul_(scale)
    return model

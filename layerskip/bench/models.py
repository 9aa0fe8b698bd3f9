"""Models and prompts for the scripts in benchmarks/: a checkpoint, or a random model of the
default shape, optionally built as the best case for self-speculative decoding.

Every script gets its prompts from BenchModel.prompts, so they decode what `layerskip bench` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layerskip.bench.prompts import paragraph_prompts, random_prompts
from layerskip.checkpoint import Checkpoint, load_checkpoint
from layerskip.config import ModelConfig
from layerskip.model import Transformer


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


def random_model(seed: int = 0, config: ModelConfig | None = None) -> Transformer:
    """Random weights (seeded) of the default shape, or of config; no dropout, eval mode."""
    torch.manual_seed(seed)
    return Transformer(config or ModelConfig(dropout=0.0)).eval()


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

"""Our weights as llama.cpp's ``llama`` tensors: names, the rotary row order, and the file's number types.

Our model is Hugging Face's LlamaForCausalLM, whose rotary embedding rotates the pairs of
dimensions (j, j + D/2) of each head ("rotate half"). llama.cpp's ``llama`` architecture rotates
adjacent pairs (2j, 2j + 1) with the same frequencies, so the rows of every head of the query and
key projections are reordered: row 2j of a head takes our row j, row 2j + 1 our row j + D/2.
Attention scores are unchanged, because queries and keys are reordered alike and values are not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from layerskip.config import ModelConfig
from layerskip.errors import CheckpointError
from layerskip.model import Transformer, scaled_frequencies

DTYPES = ("f32", "f16", "bf16", "q8_0")
F16_MAX = 65504.0

# Our parameter name -> llama.cpp's tensor name ({bid}: the block index), as gguf.TENSOR_NAMES spells them.
_TOP_LEVEL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_BLOCK = {
    "attn_norm.weight": "blk.{bid}.attn_norm.weight",
    "attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "mlp_norm.weight": "blk.{bid}.ffn_norm.weight",
    "mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
_BLOCK_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def gguf_name(name: str) -> tuple[str, int | None]:
    """(llama.cpp's name, block index or None) of our parameter; a CheckpointError for one llama.cpp lacks."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name], None
    match = _BLOCK_NAME.match(name)
    if match and match.group(2) in _BLOCK:
        block = int(match.group(1))
        return _BLOCK[match.group(2)].format(bid=block), block
    raise CheckpointError(f"the model has a parameter {name!r} that llama.cpp's llama architecture does not have; "
                          "export-gguf cannot write it")


def rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (heads * D, C) in the rotate-half order -> llama.cpp's adjacent-pair order, head by head."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_tensors(model: Transformer, num_blocks: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) of blocks [0, num_blocks), the embedding, the final norm and the head.

    A tied head is left out: llama.cpp then uses the embedding as the output matrix, as we do.
    """
    cfg = model.config
    factors = rope_freq_factors(cfg)
    if factors is not None:
        yield "rope_freqs.weight", factors
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        target, block = gguf_name(name)
        if block is not None and block >= num_blocks:
            continue  # a draft file ends after its last block
        if name.endswith("attn.q_proj.weight"):
            tensor = rope_rows(tensor, cfg.num_heads)
        elif name.endswith("attn.k_proj.weight"):
            tensor = rope_rows(tensor, cfg.kv_heads)
        yield target, tensor.detach().to("cpu", torch.float32).contiguous()


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor | None:
    """llama3 rope scaling as llama.cpp reads it: each rotary frequency's divisor (D/2,), else None.

    The divisors are our own plain frequencies over our scaled ones, so the file rotates exactly
    as `scaled_frequencies` does.
    """
    if cfg.rope_scaling is None or cfg.rope_scaling.rope_type != "llama3":
        return None
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    return (plain / scaled_frequencies(plain, cfg.rope_scaling)).contiguous()


@dataclass
class Encoded:
    """A tensor as the GGUF writer takes it: an array, its GGML type name and, for packed types, that type."""

    data: np.ndarray
    type_name: str  # "F32", "F16", "BF16" or "Q8_0"
    raw_dtype: Any = None  # gguf.GGMLQuantizationType for bytes-packed types, else None (inferred)


def encode(name: str, tensor: torch.Tensor, dtype: str) -> Encoded:
    """The tensor in the file's number type; norms (1-D) stay f32, as llama.cpp's converter keeps them.

    q8_0 packs rows in blocks of 32 values; a tensor whose rows are not a multiple of 32 is
    written as f16 instead, as llama.cpp's converter does.
    """
    import gguf

    array = tensor.numpy()
    if not np.isfinite(array).all():
        raise CheckpointError(f"tensor {name} holds NaN or infinite values; export a checkpoint with finite weights")
    if dtype == "f32" or array.ndim == 1:
        return Encoded(array, "F32")
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return Encoded(gguf.quants.quantize(array, qtype), "Q8_0", qtype)
    if dtype in ("f16", "q8_0"):
        peak = float(np.abs(array).max())
        if peak > F16_MAX:
            raise CheckpointError(f"tensor {name} holds values up to {peak:.3g}, beyond f16's range (65504); "
                                  "export with --dtype bf16 or f32")
        return Encoded(array.astype(np.float16), "F16")
    if dtype == "bf16":
        qtype = gguf.GGMLQuantizationType.BF16
        return Encoded(gguf.quants.quantize(array, qtype), "BF16", qtype)
    raise ValueError(f"unknown dtype {dtype!r}")  # export_gguf checks it first


def file_type(dtype: str) -> int:
    """general.file_type: what most of the file's tensors are."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

"""Weights of a Hugging Face directory: safetensors (one file or shards), located under our names and
checked against the config from their headers alone (layerskip.loading builds the model from them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layerskip.config import ModelConfig
from layerskip.errors import CheckpointError
from layerskip.hf.config import refusal
from layerskip.hf.layout import HF_INDEX, HF_WEIGHTS
from layerskip.hf.names import hf_name, our_name
from layerskip.loading import (
    STORED_DTYPES,
    StoredTensor,
    expected_shapes,
    read_headers,
    read_tensors,
    shape_differences,
)


def read_hf_weights(hf_dir: Path, cfg: ModelConfig) -> dict[str, StoredTensor]:
    """Our weight name -> where it is stored, for every weight ``cfg``'s model has; nothing else is read.

    Names, shapes and dtypes come from the files' headers, so weights of another shape than the
    config's are refused before anything is allocated.
    """
    tensors = _our_tensors(hf_dir)
    head = tensors.pop("lm_head.weight", None) if cfg.tie_embeddings else None  # some exports save the tied head
    _check_shapes(hf_dir, cfg, tensors)
    if head is not None and not _same_values(head, tensors["embed_tokens.weight"]):
        raise refusal(hf_dir, "tie_word_embeddings is true but lm_head.weight differs from the embedding")
    return tensors


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a directory: the shards its index lists, or the one file."""
    if (hf_dir / HF_INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / HF_INDEX).read_text())["weight_map"]
            files = sorted({hf_dir / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{hf_dir / HF_INDEX} is not a valid safetensors index ({exc})") from None
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{hf_dir} lacks weight shards {absent[:3]} listed in {HF_INDEX}")
        return files
    if (hf_dir / HF_WEIGHTS).is_file():
        return [hf_dir / HF_WEIGHTS]
    if any(hf_dir.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{hf_dir} holds pickled pytorch_model*.bin weights, which layerskip does not load; "
                              "re-save them as safetensors (model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX}")


def _our_tensors(hf_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the directory's weight files under our name (buffers we recompute are left out)."""
    tensors: dict[str, StoredTensor] = {}
    unknown: list[str] = []
    for name, stored in read_headers(weight_files(hf_dir)).items():
        try:
            ours = our_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if ours is not None:
            tensors[ours] = stored
    if unknown:
        raise refusal(hf_dir, f"the weights hold tensors a Llama without biases does not have: {unknown[:4]}")
    return tensors


def _check_shapes(hf_dir: Path, cfg: ModelConfig, tensors: dict[str, StoredTensor]) -> None:
    """Refuse weights that are missing, unexpected or of another shape than ``cfg``'s model has."""
    missing, extra, wrong = shape_differences(expected_shapes(cfg), {k: t.shape for k, t in tensors.items()})
    if missing or wrong or extra:
        raise CheckpointError(f"{hf_dir}: the weights do not match config.json (missing "
                              f"{[hf_name(k) for k in missing][:4]}, unexpected {[hf_name(k) for k in extra][:4]}, "
                              f"shapes {wrong[:4]})")


def _same_values(a: StoredTensor, b: StoredTensor) -> bool:
    """Whether two stored tensors hold the same values (compared in a's stored dtype, read from the mapping)."""
    if a.shape != b.shape or a.dtype not in STORED_DTYPES:
        return False
    pair = read_tensors({"a": a, "b": b}, torch.device("cpu"), STORED_DTYPES[a.dtype])
    return torch.equal(pair["a"], pair["b"])

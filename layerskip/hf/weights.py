"""Weights of a Hugging Face directory: safetensors (one file or shards) -> our state dict -> our model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from layerskip.config import ModelConfig
from layerskip.errors import CheckpointError
from layerskip.hf.config import refusal
from layerskip.hf.layout import HF_INDEX, HF_WEIGHTS
from layerskip.hf.names import hf_name, our_name
from layerskip.model import Transformer, rotary_tables


def read_hf_weights(hf_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors under our names, checked against what ``cfg`` expects."""
    state = _read_tensors(hf_dir)
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)  # some exports save the tied head too
        if head is not None and not torch.equal(head, state.get("embed_tokens.weight", head)):
            raise refusal(hf_dir, "tie_word_embeddings is true but lm_head.weight differs from the embedding")
    _check_shapes(hf_dir, cfg, state)
    return state


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


def _read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weight files, under our names and in fp32."""
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path in weight_files(hf_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    try:
                        ours = our_name(name)
                    except KeyError:
                        unknown.append(name)
                        continue
                    if ours is not None:
                        state[ours] = f.get_tensor(name).to(torch.float32)  # our model is fp32
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    if unknown:
        raise refusal(hf_dir, f"the weights hold tensors a Llama without biases does not have: {unknown[:4]}")
    return state


def _check_shapes(hf_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights that are missing, unexpected or of another shape than ``cfg``'s model has."""
    expected = {k: tuple(v.shape) for k, v in _meta_model(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = [hf_name(k) for k in sorted(set(expected) - set(state))]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    extra = [hf_name(k) for k in sorted(set(state) - set(expected))]
    if missing or wrong or extra:
        raise CheckpointError(f"{hf_dir}: the weights do not match config.json (missing {missing[:4]}, "
                              f"unexpected {extra[:4]}, shapes {wrong[:4]})")


def _meta_model(cfg: ModelConfig) -> Transformer:
    """The model's parameter names and shapes, without allocating or initialising weights."""
    with torch.device("meta"):
        return Transformer(cfg)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Our model holding ``state``, built without a random initialisation first (fast at 7B)."""
    model = _meta_model(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # a tied lm_head is absent on purpose
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = Transformer(cfg)  # the model has state this shortcut does not know: the plain way
        model.load_state_dict(state, strict=False)
    return model.eval()


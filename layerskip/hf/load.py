"""A Llama-architecture Hugging Face directory as a layerskip Checkpoint: loaded directly, or imported.

``load_hf`` is what every command does with such a directory (``--checkpoint HF_DIR``): nothing
is written, the weights are memory-mapped, the tokenizer is used the way the model reads text
(see ``layerskip.hf.model_tokenizers``). ``import_hf`` (``export-hf --import-from``) writes a
layerskip checkpoint instead: fp32 weights and the directory's tokenizer.model used the layerskip way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerskip.checkpoint import Checkpoint, save_checkpoint
from layerskip.config import ModelConfig, TokenizerConfig
from layerskip.dtypes import resolve_dtype
from layerskip.errors import CheckpointError
from layerskip.hf.config import (
    model_config_from_hf,
    own_export,
    own_tokenizer_config,
    read_hf_config,
    restore_own_config,
)
from layerskip.hf.layout import checked_out_dir
from layerskip.hf.model_tokenizers import JsonTokenizer, read_model_tokenizer
from layerskip.hf.tokenizer import read_hf_tokenizer, spm_tokenizer_config
from layerskip.hf.weights import read_hf_weights
from layerskip.loading import build_model, num_parameters
from layerskip.tokenizer import TextTokenizer, Tokenizer


def load_hf(hf_dir: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
            origin: str | None = None) -> Checkpoint:
    """A LlamaForCausalLM directory (config.json, safetensors, tokenizer) as a Checkpoint, written nowhere.

    ``dtype`` None or "auto": the default for the device and the model's size (layerskip.dtypes).
    A directory ``export_hf`` wrote keeps its layerskip tokenizer and settings. ``origin``: what
    the user named (such as hf:REPO), recorded in ``meta``.
    """
    hf_dir = Path(hf_dir)
    ckpt = _read(hf_dir, torch.device(device), dtype, model_way=True, origin={"loaded_from": origin or str(hf_dir)})
    ckpt.path = hf_dir
    return ckpt


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Checkpoint:
    """Load a LlamaForCausalLM directory (config.json + safetensors, sharded or not) as our model, in fp32.

    With ``out_dir``, also save it as a layerskip checkpoint there (what every command loads).
    A directory written by ``export_hf`` comes back exactly: weights, configs, tokenizer, metadata.
    The tokenizer is the directory's tokenizer.model used the layerskip way: no BOS, and its eos
    stands for a line break (Llama 2's own tokenizer adds a BOS and spells a newline as <0x0A>);
    loading the directory directly (``layerskip.load(hf_dir)``) tokenizes as the model does.
    """
    hf_dir = Path(hf_dir)
    ckpt = _read(hf_dir, torch.device("cpu"), torch.float32, model_way=False, origin={"imported_from": str(hf_dir)})
    ckpt.tokenizer_config = ckpt.tokenizer_config or spm_tokenizer_config(ckpt.tokenizer)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.resolve() == hf_dir.resolve():
            raise CheckpointError(f"--out {out_dir} is the Hugging Face directory itself; choose another")
        checked_out_dir(out_dir, hf=False)
        ckpt.path = save_checkpoint(out_dir, ckpt.model, ckpt.tokenizer, tokenizer_config=ckpt.tokenizer_config,
                                    train_config=ckpt.train_config, meta=ckpt.meta)
    return ckpt


def _read(hf_dir: Path, device: torch.device, dtype: str | torch.dtype | None, *, model_way: bool,
          origin: dict[str, str]) -> Checkpoint:
    """Config, tokenizer and weights of the directory, each checked before the weights are read.

    model_way: the tokenizer as the model reads text, unless export_hf wrote the directory (then,
    as for an import, its tokenizer.model the layerskip way). origin: the metadata of a directory
    export_hf did not write (ours keeps its own).
    """
    cfg, own = hf_model_config(hf_dir)
    tokenizer = hf_tokenizer(hf_dir, own=own) if model_way else read_hf_tokenizer(hf_dir)
    _check_vocab(hf_dir, tokenizer, cfg)
    tensors = read_hf_weights(hf_dir, cfg)
    model = build_model(cfg, tensors, device=device, dtype=resolve_dtype(dtype, device, num_parameters(cfg)))
    tokenizer_config = own_tokenizer_config(own) if own is not None else None
    return Checkpoint(model=model, tokenizer=tokenizer, model_config=cfg,
                      tokenizer_config=tokenizer_config or _describe(tokenizer),
                      train_config=own.get("train", {}) if own is not None else {},
                      meta=own.get("meta", {}) if own is not None else origin)


def hf_model_config(hf_dir: Path) -> tuple[ModelConfig, dict[str, Any] | None]:
    """The directory's model config, and the layerskip section export_hf keeps in it (None: not our export)."""
    hf = read_hf_config(hf_dir)
    own = own_export(hf)
    return restore_own_config(model_config_from_hf(hf, hf_dir), own), own


def hf_tokenizer(hf_dir: Path, *, own: dict[str, Any] | None) -> TextTokenizer:
    """The tokenizer as the model reads text; our own export's the layerskip way, as it was trained."""
    return read_model_tokenizer(hf_dir) if own is None else read_hf_tokenizer(hf_dir)


def _describe(tokenizer: TextTokenizer) -> TokenizerConfig | None:
    """Our TokenizerConfig of a SentencePiece tokenizer; None for one it cannot describe (tokenizer.json ones)."""
    try:
        return spm_tokenizer_config(tokenizer) if isinstance(tokenizer, Tokenizer) else None
    except CheckpointError:
        return None


def _check_vocab(hf_dir: Path, tokenizer: TextTokenizer, cfg: ModelConfig) -> None:
    """Refuse a tokenizer whose vocabulary is not exactly the model's embeddings."""
    name = "tokenizer.json" if isinstance(tokenizer, JsonTokenizer) else "tokenizer.model"
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: {name} has {tokenizer.vocab_size} tokens but the model only "
                              f"{cfg.vocab_size} embeddings")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: {name} has {tokenizer.vocab_size} tokens but the model has "
                              f"{cfg.vocab_size} embeddings (padded vocabularies are not supported)")

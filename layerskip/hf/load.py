"""import_hf: a Llama-architecture Hugging Face directory as a layerskip Checkpoint, optionally saved."""

from __future__ import annotations

from pathlib import Path

from layerskip.checkpoint import Checkpoint, save_checkpoint
from layerskip.config import ModelConfig
from layerskip.errors import CheckpointError
from layerskip.hf.config import (
    model_config_from_hf,
    own_export,
    own_tokenizer_config,
    read_hf_config,
    restore_own_config,
)
from layerskip.hf.layout import checked_out_dir
from layerskip.hf.tokenizer import read_hf_tokenizer, spm_tokenizer_config
from layerskip.hf.weights import build_model, read_hf_weights
from layerskip.tokenizer import Tokenizer


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Checkpoint:
    """Load a LlamaForCausalLM directory (config.json + safetensors, sharded or not) as our model.

    With ``out_dir``, also save it as a layerskip checkpoint there (what every command loads).
    A directory written by ``export_hf`` comes back exactly: weights, configs, tokenizer, metadata.
    Weights are loaded into an fp32 model. The tokenizer is the directory's tokenizer.model used
    the layerskip way: no BOS, and its eos stands for a line break (Llama 2's own tokenizer
    adds a BOS and spells a newline as <0x0A>), so give such models single-line prompts.
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    own = own_export(hf)  # None unless export_hf wrote the directory
    cfg = restore_own_config(model_config_from_hf(hf, hf_dir), own)
    tokenizer = read_hf_tokenizer(hf_dir)
    _check_vocab(hf_dir, tokenizer, cfg)
    state = read_hf_weights(hf_dir, cfg)
    tokenizer_config = (own_tokenizer_config(own) if own is not None else None) or spm_tokenizer_config(tokenizer)
    model = build_model(cfg, state)
    meta = own.get("meta", {}) if own is not None else {"imported_from": str(hf_dir)}
    train = own.get("train", {}) if own is not None else {}
    ckpt = Checkpoint(model=model, tokenizer=tokenizer, model_config=cfg, tokenizer_config=tokenizer_config,
                      train_config=train, meta=meta)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.resolve() == hf_dir.resolve():
            raise CheckpointError(f"--out {out_dir} is the Hugging Face directory itself; choose another")
        checked_out_dir(out_dir, hf=False)
        ckpt.path = save_checkpoint(out_dir, model, tokenizer, tokenizer_config=tokenizer_config,
                                    train_config=train, meta=meta)
    return ckpt


def _check_vocab(hf_dir: Path, tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    """Refuse a tokenizer whose vocabulary is not exactly the model's embeddings."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: tokenizer.model has {tokenizer.vocab_size} pieces but the model only "
                              f"{cfg.vocab_size} embeddings")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{hf_dir}: tokenizer.model has {tokenizer.vocab_size} pieces but the model has "
                              f"{cfg.vocab_size} embeddings (padded vocabularies are not supported)")

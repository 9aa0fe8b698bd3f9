"""Checkpoints: a directory with weights, config and tokenizer, written atomically.

Layout of a checkpoint directory::

    config.json         schema version, model / tokenizer / training config, metadata
    model.safetensors   weights (safetensors: loading can never run code)
    tokenizer.model     the SentencePiece model the weights were trained with
    token_counts.npy    optional: how often each token id occurs in the training split,
                        which ranks the vocabulary for the short decoding head
    trainer_state.pt    optional: optimizer, scheduler, RNG, curriculum and data position,
                        loaded only with ``torch.load(weights_only=True)``

A run directory holds ``best/`` and ``last/`` checkpoints; wherever the CLI takes a
checkpoint, a run directory means its best one. Writes go to a temporary sibling that
is renamed into place, so an interrupted write never leaves a broken checkpoint.

``load_checkpoint`` also loads what ``layerskip.sources`` recognises besides (a Hugging Face
Llama directory, ``hf:REPO``), through ``layerskip.hf.load``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from layerskip.config import ModelConfig, TokenizerConfig
from layerskip.dtypes import resolve_dtype
from layerskip.errors import CheckpointError, ConfigError
from layerskip.loading import build_model, expected_shapes, num_parameters, read_headers, shape_differences
from layerskip.model import Transformer
from layerskip.tokenizer import TextTokenizer, Tokenizer

SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
TRAINER_STATE_FILE = "trainer_state.pt"
TOKEN_COUNTS_FILE = "token_counts.npy"
RUN_SUBDIRS = ("best", "last")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its tokenizer and configs, and where it came from."""

    model: Transformer
    tokenizer: TextTokenizer
    model_config: ModelConfig
    tokenizer_config: TokenizerConfig | None  # None: not a SentencePiece tokenizer layerskip can describe
    train_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        """The model's shape (an alias of model_config)."""
        return self.model_config


def _weights_state(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    return state


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    tokenizer_config: TokenizerConfig,
    train_config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a temporary sibling, then renames)."""
    config = {
        "schema_version": SCHEMA_VERSION,
        "format": "layerskip-checkpoint",
        "model": model.config.to_dict(),
        "tokenizer": tokenizer_config.to_dict(),
        "train": train_config or {},
        "meta": meta or {},
    }

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(_weights_state(model), tmp / WEIGHTS_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if model.token_counts is not None:
            np.save(tmp / TOKEN_COUNTS_FILE, model.token_counts.cpu().numpy().astype(np.int64), allow_pickle=False)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)

    return write_dir_atomically(Path(path), write)


def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling with `write(tmp)`, fsync its files, then rename it into place.

    An interrupted write never leaves a broken directory at `path`: before the final rename
    the old one is still there, and between the two renames it waits at .NAME.old, which
    `resolve_checkpoint_dir` puts back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_swap(path: Path) -> None:
    """If a write died between its two renames, the previous checkpoint is at .NAME.old."""
    if not path.name:  # "." or "/": a directory that exists, so nothing was swapped away
        return
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (meaning its best, else last, checkpoint)."""
    path = Path(path)
    _recover_interrupted_swap(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run directory, a checkpoint directory, a "
                              "Hugging Face model directory or hf:OWNER/NAME")
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file, but a layerskip checkpoint is a directory holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}; pass that directory (or a run directory)"
        )
    if (path / CONFIG_FILE).is_file():
        return path
    for sub in RUN_SUBDIRS:
        _recover_interrupted_swap(path / sub)
        if (path / sub / CONFIG_FILE).is_file():
            return path / sub
    raise CheckpointError(
        f"{path} is neither a checkpoint directory (no {CONFIG_FILE}) nor a run directory "
        f"(no {'/ or '.join(RUN_SUBDIRS)}/ checkpoint)"
    )


def read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / CONFIG_FILE} must hold a JSON object")
    version = config.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint schema version {version!r}; this layerskip reads version "
            f"{SCHEMA_VERSION}. Upgrade layerskip, or re-create the checkpoint"
        )
    return config


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = torch.float32) -> Checkpoint:
    """Load weights, config and tokenizer; every problem becomes a CheckpointError.

    `path`: anything ``layerskip.sources.resolve_source`` recognises (a layerskip checkpoint or run
    directory, a Hugging Face Llama directory, hf:REPO). ``dtype``: float32 (the default),
    bfloat16, float16, or None / "auto" for the default of the device and size (layerskip.dtypes).
    """
    from layerskip.sources import resolve_source

    source = resolve_source(path)
    if source.kind == "hf":
        from layerskip.hf.load import load_hf

        return load_hf(source.directory, device=device, dtype=dtype, origin=source.spec)
    return _load_layerskip(source.directory, torch.device(device), dtype)


def read_configs(directory: Path) -> tuple[ModelConfig, TokenizerConfig, dict[str, Any]]:
    """A checkpoint's model and tokenizer configs, and all of config.json."""
    config = read_config(directory)
    try:
        model_config = ModelConfig.from_dict(config.get("model", {}))
        tokenizer_config = TokenizerConfig.from_dict(config.get("tokenizer", {}))
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
    return model_config, tokenizer_config, config


def _load_layerskip(directory: Path, device: torch.device, dtype: str | torch.dtype | None) -> Checkpoint:
    model_config, tokenizer_config, config = read_configs(directory)
    tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model expects "
            f"{model_config.vocab_size}; the tokenizer does not belong to these weights"
        )
    model = load_weights(model_config, directory / WEIGHTS_FILE, device,
                         resolve_dtype(dtype, device, num_parameters(model_config)))
    model.set_token_counts(load_token_counts(directory / TOKEN_COUNTS_FILE, model_config.vocab_size))
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        model_config=model_config,
        tokenizer_config=tokenizer_config,
        train_config=config.get("train", {}),
        meta=config.get("meta", {}),
        path=directory,
    )


def load_weights(cfg: ModelConfig, weights_path: Path, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model `cfg` describes holding the safetensors weights, checked against `cfg` from the header alone
    (so a config of absurd size is refused before anything is allocated)."""
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint has no weights")
    stored = read_headers([weights_path])
    missing, unexpected, wrong_shape = shape_differences(expected_shapes(cfg), {k: t.shape for k, t in stored.items()})
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shape mismatch {wrong_shape[:4]} (weights vs config)" if wrong_shape else "",
            )
            if part
        )
        raise CheckpointError(f"{weights_path}: the config does not match the weights ({details})")
    return build_model(cfg, stored, device=device, dtype=dtype)  # a tied lm_head.weight is absent on purpose


def load_token_counts(path: Path, vocab_size: int) -> torch.Tensor | None:
    """The optional training-split token counts; None when the checkpoint has none."""
    if not path.exists():
        return None
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc}); delete it (it is optional) or "
                              "use another checkpoint") from None
    if counts.shape != (vocab_size,) or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise CheckpointError(f"{path} must hold {vocab_size} non-negative integer counts (one per token id), "
                              f"got shape {counts.shape} of {counts.dtype}; delete it (it is optional)")
    return torch.from_numpy(counts.astype(np.int64))


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    """Training state for --resume, loaded in a mode that cannot execute code."""
    state_path = resolve_checkpoint_dir(path) / TRAINER_STATE_FILE
    if not state_path.is_file():
        return None
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal, truncation: all mean "unusable"
        raise CheckpointError(
            f"{state_path} cannot be loaded safely ({type(exc).__name__}); it is corrupt or holds "
            "code-running objects. Resume from another checkpoint"
        ) from None

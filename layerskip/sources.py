"""What a --checkpoint names: the one place that decides, so every command and ``layerskip.load`` agree.

- ``hf:OWNER/NAME`` (or ``hf:OWNER/NAME@REVISION``): a Hugging Face hub repository, downloaded
  into the hub's cache (the ``hub`` extra), then read as the directory below;
- a directory whose config.json has a ``model_type`` and no layerskip schema version: a Hugging
  Face model directory (a Llama: config.json, safetensors, tokenizer), read in place;
- a layerskip checkpoint directory (config.json with ``"format": "layerskip-checkpoint"``);
- a run directory: its ``best/`` checkpoint, else ``last/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from layerskip.checkpoint import CONFIG_FILE, TOKENIZER_FILE, read_configs, resolve_checkpoint_dir
from layerskip.config import ModelConfig
from layerskip.tokenizer import TextTokenizer, Tokenizer

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Source:
    """A resolved --checkpoint: which kind of model it is and the directory holding it."""

    kind: str  # "layerskip" or "hf"
    directory: Path
    spec: str  # as the user wrote it


def resolve_source(path: str | os.PathLike[str]) -> Source:
    """The Source `path` names; a CheckpointError (one line) when it names nothing loadable."""
    spec = os.fspath(path)
    if spec.startswith(HF_PREFIX):
        from layerskip.hf.hub import download

        return Source("hf", download(spec[len(HF_PREFIX):]), spec)
    directory = resolve_checkpoint_dir(spec)
    return Source("hf" if is_hf_directory(directory) else "layerskip", directory, spec)


def is_hf_directory(directory: Path) -> bool:
    """Whether config.json is a Hugging Face model's (a model_type, no layerskip schema version).

    Anything unreadable counts as layerskip's, whose loader then names the problem.
    """
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "schema_version" not in config


def read_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The model config of what `path` names, without reading weights."""
    source = resolve_source(path)
    if source.kind == "hf":
        from layerskip.hf.load import hf_model_config

        return hf_model_config(source.directory)[0]
    return read_configs(source.directory)[0]


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """The tokenizer of what `path` names (as ``load_checkpoint`` would give it), without reading weights."""
    source = resolve_source(path)
    if source.kind == "hf":
        from layerskip.hf.load import hf_model_config, hf_tokenizer

        return hf_tokenizer(source.directory, own=hf_model_config(source.directory)[1])
    return Tokenizer.load(source.directory / TOKENIZER_FILE)

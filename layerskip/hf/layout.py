"""The files of a Hugging Face model directory, and when an output directory may be replaced."""

from __future__ import annotations

import json
from pathlib import Path

from layerskip.errors import CheckpointError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_GENERATION_CONFIG = "generation_config.json"
SPM_MODEL = "tokenizer.model"


def checked_out_dir(out_dir: Path, *, hf: bool) -> None:
    """Refuse to replace a non-empty directory unless it is an earlier output of the same kind."""
    if out_dir.is_file():
        raise CheckpointError(f"--out {out_dir} is a file; give a directory path")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    try:
        config = json.loads((out_dir / HF_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    same_kind = isinstance(config, dict) and (
        config.get("model_type") == "llama" if hf else config.get("format") == "layerskip-checkpoint"
    )
    if not same_kind:
        what = "a Hugging Face Llama directory" if hf else "a layerskip checkpoint"
        raise CheckpointError(f"--out {out_dir} exists and is not {what}, so it will not be replaced; "
                              "choose a new directory")

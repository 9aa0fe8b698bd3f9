"""Continual training: a run that starts from an existing model instead of a seeded one.

The checkpoint (anything ``layerskip.load`` reads) fixes the model's shape and its tokenizer,
which encodes the corpus; the optimizer starts fresh and the schedule and LayerSkip settings
are the run's own. The run records where it started (``init_from`` in its config and meta), and
a resume continues from its own last/ checkpoint, never from the starting one again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from layerskip.errors import CheckpointError, ConfigError
from layerskip.training.config import TrainConfig

# Settings the starting checkpoint decides; a flag that disagrees is refused.
SHAPE_SETTINGS = ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size", "tokenizer_type")


def load_start(source: Any) -> Any:
    """The starting checkpoint: a loaded Checkpoint as is, else whatever ``layerskip.load`` reads, on the CPU."""
    from layerskip.checkpoint import Checkpoint

    if isinstance(source, Checkpoint):
        return source
    from layerskip.api import load

    return load(source, device="cpu")


def source_name(ckpt: Any) -> str:
    """How a run records its starting checkpoint: the absolute path of the directory read."""
    return str(Path(ckpt.path).resolve()) if ckpt.path is not None else "a checkpoint loaded in memory"


def shape_of(ckpt: Any) -> dict[str, Any]:
    """The checkpoint's values of SHAPE_SETTINGS, and the context it was trained with."""
    mc = ckpt.model_config
    return {"d_model": mc.d_model, "num_layers": mc.num_layers, "num_heads": mc.num_heads, "d_ff": mc.d_ff,
            "vocab_size": mc.vocab_size, "tokenizer_type": ckpt.tokenizer_config.model_type,
            "seq_len": int((ckpt.train_config or {}).get("seq_len", mc.max_seq_len))}


def init_config(ckpt: Any, settings: dict[str, Any]) -> TrainConfig:
    """The config of a run starting from `ckpt`: its shape, the given training settings.

    A shape setting that disagrees with the checkpoint is one ConfigError naming every one;
    seq_len (default: the checkpoint's) may be anything up to the model's context.
    """
    shape = shape_of(ckpt)
    name = source_name(ckpt)
    clashes = [f"{k}={shape[k]!r} (given {settings[k]!r})" for k in SHAPE_SETTINGS
               if k in settings and settings[k] != shape[k]]
    if clashes:
        raise ConfigError(f"--init-from {name} fixes the model's shape and tokenizer: it has {', '.join(clashes)}; "
                          "drop these flags, or train from scratch without --init-from")
    seq_len = settings.get("seq_len", shape["seq_len"])
    context = ckpt.model_config.max_seq_len
    if isinstance(seq_len, int) and seq_len > context:
        raise ConfigError(f"--seq_len {seq_len} is longer than the context of {name} ({context} tokens); "
                          f"give --seq_len {context} or less")
    return TrainConfig.from_dict({**settings, **shape, "seq_len": seq_len, "init_from": name})


def check_matches(cfg: TrainConfig, ckpt: Any) -> None:
    """Refuse a config whose shape is not the starting checkpoint's (one built without init_config)."""
    shape = shape_of(ckpt)
    clashes = [f"{k}={shape[k]!r} (the config has {getattr(cfg, k)!r})" for k in SHAPE_SETTINGS
               if getattr(cfg, k) != shape[k]]
    if clashes or cfg.seq_len > ckpt.model_config.max_seq_len:
        raise ConfigError(f"the training config does not fit its init_from checkpoint {source_name(ckpt)}: "
                          f"{', '.join(clashes) or 'seq_len beyond its context'}; build it with "
                          "layerskip.training.init_config")


def start_record(ckpt: Any) -> dict[str, Any]:
    """What a run's checkpoints and metrics record about where it started."""
    meta = ckpt.meta or {}
    return {"path": source_name(ckpt), "step": meta.get("step"), "plain": meta.get("plain"),
            "train": {k: (ckpt.train_config or {}).get(k) for k in ("max_skip_prob", "early_exit_scale")}}


def same_start(given: Any) -> str:
    """A resume's --init-from, as the run records it, so that naming the same start again is accepted."""
    from layerskip.checkpoint import Checkpoint, resolve_checkpoint_dir

    if isinstance(given, Checkpoint):
        return source_name(given)
    try:
        return str(resolve_checkpoint_dir(given).resolve())
    except CheckpointError:  # not a layerskip directory (a Hugging Face one): compare the paths
        return str(Path(os.fspath(given)).resolve())


def check_tokenizer(corpus: Any, tokenizer: Any, what: str) -> None:
    """Refuse a corpus encoded with another tokenizer than the model's."""
    mine, theirs = getattr(corpus.tokenizer, "model_proto", None), getattr(tokenizer, "model_proto", None)
    if mine is not None and theirs is not None and mine != theirs:
        raise ConfigError(f"the corpus given was encoded with another tokenizer than {what}'s; "
                          "load it with that tokenizer (layerskip.data.load_corpus(tokenizer=...)) or pass none")

"""export_gguf: a layerskip checkpoint as llama.cpp GGUF files, the full model and optionally its draft.

The draft file holds blocks [0, E), the shared final norm and the shared head: a Llama of E
layers whose logits are our exit after E blocks, which llama.cpp's speculative decoding can use
as the draft model of the full file.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerskip import __version__
from layerskip.checkpoint import RUN_SUBDIRS, Checkpoint, load_checkpoint
from layerskip.config import ModelConfig
from layerskip.errors import CheckpointError, ConfigError
from layerskip.gguf.tensors import DTYPES, encode, file_type, llama_tensors
from layerskip.gguf.vocab import Vocab, gguf_vocab

GGUF_MAGIC = b"GGUF"
ARCH = "llama"
# ModelConfig fields the export writes (or, for training-only ones, that do not matter to inference).
# A field outside this set that is not at its default (say, a rope scaling added later) is refused
# until the export learns to write it.
_WRITTEN = {"vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "max_seq_len", "rope_theta",
            "norm_eps", "tie_embeddings", "head_dim", "rope_scaling"}
_TRAINING_ONLY = {"dropout", "init_std"}


@dataclass
class GGUFExport:
    """What export_gguf wrote: the files and the number type of each tensor of the full model."""

    path: Path
    draft_path: Path | None = None
    draft_layer: int | None = None
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> "F32", "F16", "BF16" or "Q8_0"


def export_gguf(checkpoint: Checkpoint | str | Path, out: str | Path, *, dtype: str = "f32",
                draft_layer: int | None = None, draft_out: str | Path | None = None) -> GGUFExport:
    """Write ``checkpoint`` as a llama.cpp GGUF file (architecture llama) and, with ``draft_layer`` E and
    ``draft_out``, its first E blocks with the shared final norm and head as a second one.

    Files are written to temporary siblings and renamed into place; an existing file is replaced
    only if it is a GGUF file. Needs the ``gguf`` package (pip install -e ".[gguf]").
    """
    _import_gguf()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    cfg = ckpt.model.config
    out, draft = Path(out), None if draft_out is None else Path(draft_out)
    _check_request(cfg, dtype, out, draft_layer, draft)
    vocab = gguf_vocab(ckpt.tokenizer)
    name = _model_name(ckpt)
    jobs = [(out, cfg.num_layers, f"{name}: a LayerSkip model exported by layerskip {__version__}")]
    if draft is not None and draft_layer is not None:
        jobs.append((draft, draft_layer, f"{name}: its first {draft_layer} of {cfg.num_layers} blocks with the "
                                         "shared final norm and head, a self-speculative draft"))
    temps: list[tuple[Path, Path]] = []
    try:
        types = []
        for path, blocks, description in jobs:
            temps.append((_temp_sibling(path), path))
            types.append(_write(temps[-1][0], ckpt, vocab, dtype, blocks, name, description))
        for tmp, path in temps:  # both files are complete before either replaces anything
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return GGUFExport(path=out, draft_path=draft, draft_layer=draft_layer if draft else None,
                      tensor_types=types[0])


def _model_name(ckpt: Checkpoint) -> str:
    """general.name: the run's directory name (a run's best/ or last/ checkpoint is named after the run), or
    the hub repository's name (hf:OWNER/NAME, whose directory is a snapshot named by its commit)."""
    origin = ckpt.meta.get("loaded_from")
    if isinstance(origin, str) and origin.startswith("hf:"):
        return origin.removeprefix("hf:").partition("@")[0].rsplit("/", 1)[-1]
    if ckpt.path is None:
        return "layerskip"
    path = Path(ckpt.path).resolve()
    return path.parent.name if path.name in RUN_SUBDIRS else path.name


def _import_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError('export-gguf needs the gguf package (llama.cpp\'s GGUF writer): pip install -e ".[gguf]"') \
            from None


def _check_request(cfg: ModelConfig, dtype: str, out: Path, draft_layer: int | None, draft: Path | None) -> None:
    """Refuse bad options and models GGUF's llama architecture cannot express, before writing anything."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (draft_layer is None) != (draft is None):
        raise ConfigError("--draft_layer and --draft_out go together: give both to write a draft file, or neither")
    if draft_layer is not None and not (isinstance(draft_layer, int) and 1 <= draft_layer < cfg.num_layers):
        raise ConfigError(f"--draft_layer must be in 1..{cfg.num_layers - 1} (the model has {cfg.num_layers} "
                          f"blocks), got {draft_layer!r}")
    if draft is not None and draft.resolve() == out.resolve():
        raise ConfigError(f"--draft_out and --out are the same file {out}; give the draft its own path")
    for path in (out, draft):
        if path is not None:
            check_replaceable(path)
    _refuse_unknown_settings(cfg)


def check_replaceable(path: Path) -> None:
    """A path may be written if nothing is there or a GGUF file is (an earlier export); never anything else."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the path of a .gguf file")
    if path.exists() and not is_gguf(path):
        raise ConfigError(f"{path} exists and is not a GGUF file, so it will not be replaced; choose another path")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _refuse_unknown_settings(cfg: ModelConfig) -> None:
    for f in dataclasses.fields(cfg):
        if f.name in _WRITTEN or f.name in _TRAINING_ONLY:
            continue
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            raise CheckpointError(f"the model has {f.name}={value!r}, which export-gguf cannot write to GGUF yet "
                                  f"(it writes {', '.join(sorted(_WRITTEN))}); export a model without it")


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to path (created by the writer, so with the usual permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _write(path: Path, ckpt: Checkpoint, vocab: Vocab, dtype: str, blocks: int, name: str,
           description: str) -> dict[str, str]:
    """One complete GGUF file at path (fsynced); returns each tensor's number type."""
    import gguf

    writer = gguf.GGUFWriter(path, ARCH)
    types = {}
    try:
        _write_settings(writer, ckpt.model.config, blocks, dtype, name, description)
        vocab.write(writer)
        for tensor_name, tensor in llama_tensors(ckpt.model, blocks):
            encoded = encode(tensor_name, tensor, dtype)
            writer.add_tensor(tensor_name, encoded.data, raw_dtype=encoded.raw_dtype)
            types[tensor_name] = encoded.type_name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return types


def _write_settings(writer: Any, cfg: ModelConfig, blocks: int, dtype: str, name: str, description: str) -> None:
    """The general.* and llama.* keys: shape, attention, rotary positions, norm."""
    import gguf

    writer.add_name(name)
    writer.add_description(description)
    writer.add_file_type(file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)  # every dimension rotates
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_uint32("layerskip.block_count_full", cfg.num_layers)  # a draft file's model has more blocks

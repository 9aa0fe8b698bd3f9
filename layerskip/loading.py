"""A Transformer from safetensors files, refused before any allocation when config and weights disagree.

Both loaders (layerskip checkpoints, Hugging Face directories) go through here:

1. ``read_headers``: every tensor's name, shape and dtype from the files' headers (no data read);
2. ``shape_differences`` against the shapes the config implies, computed on the meta device, so a
   config.json claiming d_model 1e9 is refused without trying to allocate terabytes;
3. ``build_model``: the model is built on the meta device and handed the tensors read from the
   memory-mapped files (safetensors' safe_open). Tensors already in the target dtype stay views of
   the private (copy-on-write) mapping, so the weights are the file's pages, read on first use;
   others are converted one at a time, each read through a mapping of its own that is closed
   before the next, so the peak is about one copy of the weights in the target dtype.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from layerskip.config import ModelConfig
from layerskip.errors import CheckpointError
from layerskip.model import Transformer

# safetensors' dtype names of the floating tensors a model's weights can be stored in
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies, and its shape and dtype as the file's header states them."""

    file: Path
    name: str  # its name in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


def read_headers(files: list[Path]) -> dict[str, StoredTensor]:
    """name -> StoredTensor for every tensor of the files; only headers are read (safetensors validates them)."""
    stored: dict[str, StoredTensor] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    stored[name] = StoredTensor(path, name, tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt ({exc}); use another checkpoint") from None
    return stored


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with nothing allocated or initialised."""
    with torch.device("meta"):
        return Transformer(cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our weight names -> shapes for `cfg` (a tied head is the embedding, so it is not listed)."""
    shapes = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def num_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes (a tied head counted once), without building it."""
    return sum(math.prod(shape) for shape in expected_shapes(cfg).values())


def shape_differences(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]
                      ) -> tuple[list[str], list[str], list[str]]:
    """(missing names, unexpected names, "name: stored vs expected" for shape mismatches)."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [f"{k}: {stored[k]} vs {v}" for k, v in expected.items() if k in stored and stored[k] != v]
    return missing, unexpected, wrong


def build_model(cfg: ModelConfig, tensors: dict[str, StoredTensor], *, device: torch.device,
                dtype: torch.dtype) -> Transformer:
    """The model for `cfg` holding `tensors` (our name -> where it is stored), on `device` in `dtype`, in eval mode.

    The caller has checked names and shapes (shape_differences); a tied head is the embedding.
    """
    model = meta_model(cfg)
    model.load_state_dict(read_tensors(tensors, device, dtype), strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rotary(device, dtype)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"built without values for {left[:4]}: the loader does not know this model's state")
    return model.eval()


def read_tensors(tensors: dict[str, StoredTensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor in `dtype` on `device`: zero-copy views of the mapped files where nothing changes,
    converted copies otherwise (one mapping per tensor, so the file's pages do not accumulate)."""
    for ours, st in tensors.items():
        if st.dtype not in STORED_DTYPES:
            raise CheckpointError(f"{st.file}: {st.name} is stored as {st.dtype}, not as floating-point weights "
                                  f"({', '.join(STORED_DTYPES)}); quantized weights are not supported")
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for ours, st in tensors.items():
            if device.type == "cpu" and STORED_DTYPES[st.dtype] == dtype:
                if st.file not in handles:
                    handles[st.file] = stack.enter_context(safe_open(st.file, framework="pt"))
                out[ours] = handles[st.file].get_tensor(st.name)  # type: ignore[attr-defined]
                continue
            with safe_open(st.file, framework="pt") as f:  # a mapping of its own, unmapped when closed
                out[ours] = f.get_tensor(st.name).to(device=device, dtype=dtype)
    return out

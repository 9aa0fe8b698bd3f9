"""The dtype a model is loaded and decoded in: `--dtype float32|bfloat16|float16|auto` -> a torch.dtype.

The default ("auto") depends on where the model runs and how large it is:

- CPU: float32 below a threshold in parameters, bfloat16 from there on. Decoding one token
  reads every weight once; a small model's step is bound by per-call overhead, where
  bfloat16's conversions make it slower, while a larger model's step is bound by memory
  bandwidth, where half the bytes is nearly half the time, and where float32 would also need
  twice the memory. The threshold lies between the sizes measured faster in each
  (docs/results.md): CPU_BF16_KERNELS_MIN_PARAMETERS where layerskip's bf16 kernels run
  (``kernels.available()``), CPU_BF16_MIN_PARAMETERS with torch's slower bf16 products.
- CUDA: bfloat16 (float16 on a GPU without bfloat16).
- MPS: float32 (not measured).
"""

from __future__ import annotations

import torch

from layerskip import kernels
from layerskip.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
CPU_BF16_MIN_PARAMETERS = 500_000_000  # torch's bf16 products: float32 was faster up to 334M
CPU_BF16_KERNELS_MIN_PARAMETERS = 30_000_000  # layerskip's: float32 faster up to 15.7M, bfloat16 from 54.5M


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype, or None for "auto" / None (choose by device and size); anything else is a ConfigError."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")


def default_dtype(device: torch.device, num_parameters: int) -> torch.dtype:
    """The dtype "auto" means for a model of `num_parameters` on `device` (see the module docstring)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and num_parameters >= cpu_bf16_min_parameters():
        return torch.bfloat16
    return torch.float32


def cpu_bf16_min_parameters() -> int:
    """The size from which "auto" is bfloat16 on this CPU."""
    return CPU_BF16_KERNELS_MIN_PARAMETERS if kernels.available() else CPU_BF16_MIN_PARAMETERS


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, num_parameters: int) -> torch.dtype:
    """The dtype asked for, or the default for this device and size."""
    chosen = parse_dtype(dtype)
    return default_dtype(device, num_parameters) if chosen is None else chosen


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")

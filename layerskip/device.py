"""`--device auto|cpu|cuda|mps` -> a torch.device, with one clear error when it is not there."""

from __future__ import annotations

import torch

from layerskip.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """auto picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if device not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda or mps, got {device!r}")
    return torch.device(device)

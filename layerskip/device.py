"""Devices: `--device auto|cpu|cuda|mps` -> a torch.device, timing across devices, decoding threads,
CPU memory reuse."""

from __future__ import annotations

import os

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


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a timer read afterwards measures it (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Decoding one sequence on CPU uses the idle cores from this many parameters up, one thread
# below (see decoding_threads).
THREADS_MIN_PARAMETERS = 100_000_000


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not busy with other work: cores minus the whole part of the 1-minute load average (at least 1)."""
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            load = 0.0
    return max(1, min(cores, cores - int(load)))


def decoding_threads(num_parameters: int, device: torch.device | str, cores: int | None = None,
                     load: float | None = None, *, kernels_run: bool | None = None) -> int:
    """torch CPU threads for decoding one sequence of a model with num_parameters on device.

    On CPU with torch's own kernels a small model's step is a chain of tiny products whose cost
    is dispatch and thread wake-ups: one thread is fastest. From THREADS_MIN_PARAMETERS up, each
    product reads megabytes of weights and is bound by memory bandwidth, which one core cannot
    saturate: every idle core reads its share. Where layerskip's kernels run (kernels_run,
    default ``kernels.available()``), a block is one call whose products share their columns
    among the threads: every idle core was faster at every size measured, from 2.6M up
    (docs/results.md). Cores another process keeps busy are left out: a thread that waits for a
    descheduled sibling stalls every product (on 2 cores at load 5, 2 threads decoded 6-100x
    slower than 1 at every size). cores, load: defaults the machine's now. On a GPU the host
    only launches kernels: one thread.
    """
    if torch.device(device).type != "cpu":
        return 1
    if kernels_run is None:
        from layerskip import kernels

        kernels_run = kernels.available()
    if num_parameters < THREADS_MIN_PARAMETERS and not kernels_run:
        return 1
    return idle_cores(cores, load)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_configured: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc reuse freed CPU memory instead of returning it to the kernel; True when in effect.

    A training step allocates and frees hundreds of MB of activations and logits. glibc
    serves each large block with a fresh mmap and unmaps it on free, so every step
    page-faults all of it in again: at the default size 14% of a study's CPU time went to
    the kernel. With mmap off and trimming effectively off, freed blocks stay in the heap
    and are reused. Five interleaved pairs of 40-step runs on 2 cores: page faults 3.35M ->
    0.64M, kernel time 8.1 -> 2.7 s, mean step 0.630 -> 0.576 s (8.5% faster). The cost is
    that the process keeps its peak memory until it exits. Set
    LAYERSKIP_KEEP_FREED_MEMORY=0 to leave the allocator alone; without glibc (macOS,
    musl) this does nothing.
    """
    global _allocator_configured
    if _allocator_configured is None:
        _allocator_configured = _configure_glibc_malloc()
    return _allocator_configured


def _configure_glibc_malloc() -> bool:
    import ctypes
    import os
    import sys

    if os.environ.get("LAYERSKIP_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))

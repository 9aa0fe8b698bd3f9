"""What a benchmark ran on: the machine, its load, the process's memory, the library versions."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy
import torch

from layerskip import __version__, kernels


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def machine_info(device: torch.device) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "load_average": load_average(),  # other work on the machine skews timings; see also load_average_end
        "bf16_kernels": kernels.status(),  # whether bf16 decoding on CPU ran layerskip's kernels or torch's
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "layerskip": __version__,
            "numpy": numpy.__version__}

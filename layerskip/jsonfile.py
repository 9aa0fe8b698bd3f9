"""Every JSON document layerskip writes: strict JSON, one document per file, written atomically.

results.json, thresholds.json, evaluation and generation records all go through
``write_json``: non-finite numbers become null (strict JSON has no NaN or Infinity), the
file appears complete or not at all (a temporary sibling, then a rename), and an output
path that is a directory is one clear error.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from layerskip.errors import ConfigError


def sanitize(value: Any) -> Any:
    """A strict-JSON-safe copy: non-finite floats become null, tuples lists, tensors and numpy scalars numbers."""
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return sanitize(value.tolist())
    return str(value)


def write_json(path: str | Path, document: Any, *, flag: str = "--out") -> Path:
    """Write `document` to `path` atomically; `flag` names the option in error messages."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")
    parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(sanitize(document), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

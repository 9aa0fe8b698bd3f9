"""Reading a results.json from `layerskip bench` and checking it is one before drawing anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerskip.errors import DataError

RESULTS_FORMAT = "layerskip-bench"


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a results.json; problems become a DataError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; write one with `layerskip bench --out {path}`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run `layerskip bench`") from None
    check_results(results, str(path))
    return results


def check_results(results: Any, name: str = "results") -> None:
    """Raise a DataError unless results look like a bench results file with models and configs."""
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise DataError(f"{name} is not a layerskip bench results file (no \"format\": \"{RESULTS_FORMAT}\")")
    models = results.get("models")
    if not isinstance(models, list) or not models:
        raise DataError(f"{name} holds no models; re-run `layerskip bench`")
    for model in models:
        if not isinstance(model, dict) or not isinstance(model.get("configs"), list):
            raise DataError(f"{name}: every model needs a list of configs; re-run `layerskip bench`")

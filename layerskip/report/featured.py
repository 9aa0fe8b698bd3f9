"""Which configs the report features: the DEE and SSD configs a reader most wants to see."""

from __future__ import annotations

from typing import Any


def featured_dee(model: dict[str, Any]) -> dict[str, Any] | None:
    """The DEE config a reader most wants to see: calibrated if run, else the fastest that exits early
    with ROUGE-L >= 0.9, else the one that exits earliest."""
    dee = [c for c in model["configs"] if c["strategy"] == "dee" and c.get("exit_layer_counts")]
    if not dee:
        return None
    calibrated = [c for c in dee if c.get("options", {}).get("calibrated")]
    if calibrated:
        return calibrated[0]
    depth = model.get("num_layers") or len(dee[0]["exit_layer_counts"])
    faithful = [c for c in dee if (c.get("rouge_l") or 0) >= 0.9 and (c.get("mean_exit_layer") or depth) < depth]
    if faithful:
        return max(faithful, key=lambda c: c.get("speedup") or 0)
    return min(dee, key=lambda c: (c.get("mean_exit_layer") or depth, -(c.get("speedup") or 0)))


def featured_ssd(model: dict[str, Any], greedy: bool = True) -> dict[str, Any] | None:
    """The fastest greedy (or sampled) SSD config."""
    ssd = [c for c in model["configs"] if c["strategy"] == "ssd" and c.get("greedy", True) == greedy]
    return max(ssd, key=lambda c: c.get("speedup") or 0) if ssd else None

"""One config's runs -> its summary in results.json: medians of speed, speed-up against its AR
reference, fidelity to AR greedy, and what SSD accepted or where DEE exited."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from layerskip.bench.metrics import fidelity
from layerskip.bench.settings import BenchConfig, Run


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def add_histograms(total: list[int], hist: Any) -> list[int]:
    """Sum a histogram given as a list (index = value) or a {value: count} dict into total."""
    if isinstance(hist, dict):
        items = [(int(k), int(v)) for k, v in hist.items()]
    elif isinstance(hist, (list, tuple)):
        items = [(i, int(v)) for i, v in enumerate(hist)]
    else:
        return total
    for value, count in items:
        if value >= len(total):
            total.extend([0] * (value + 1 - len(total)))
        total[value] += count
    return total


def weighted_stat(runs: list[Run], key: str) -> float | None:
    """A per-run statistic averaged over runs, weighted by each run's new tokens."""
    pairs = [(r.stats[key], len(r.tokens)) for r in runs if isinstance(r.stats.get(key), (int, float))]
    weight = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / weight if weight else None


def ssd_summary(runs: list[Run], num_layers: int) -> dict[str, Any]:
    """Acceptance pooled over all rounds of all runs, and the work SSD does per new token.

    Every round runs all L blocks (E drafting, L-E verifying) on drafted + 1 positions and
    evaluates the head on each draft and on each verified position, so per new token:
    blocks = L (drafted + rounds) / tokens and heads = (2 drafted + rounds) / tokens.
    """
    hist: list[int] = []
    for r in runs:
        add_histograms(hist, r.stats.get("accepted_length_histogram"))
    drafted = sum(r.stats.get("drafted_tokens", 0) for r in runs)
    accepted = sum(r.stats.get("accepted_tokens", 0) for r in runs)
    rounds = sum(r.stats.get("rounds", 0) for r in runs)
    new = sum(len(r.tokens) for r in runs)
    short = any(r.stats.get("draft_vocab") for r in runs)  # drafts read the short head
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": accepted / rounds if rounds else None,
        "accepted_length_histogram": hist or None,
        "rounds": rounds,
        "tokens_per_round": new / rounds if rounds else None,
        "blocks_per_token": num_layers * (drafted + rounds) / new if new else None,
        "head_evals_per_token": ((1 if short else 2) * drafted + rounds) / new if new else None,
        "short_head_evals_per_token": (drafted if short else 0) / new if new else None,
    }


def dee_summary(runs: list[Run], num_layers: int) -> dict[str, Any]:
    """Where DEE's tokens exited: how many after each block 1..L, and the mean exit layer."""
    counts = [0] * num_layers
    for r in runs:
        for info in r.token_info:
            if "exit_layer" in info:
                counts[int(info["exit_layer"]) - 1] += 1
    total = sum(counts)
    return {
        "mean_exit_layer": sum((i + 1) * n for i, n in enumerate(counts)) / total if total else None,
        "exit_layer_counts": counts if total else None,
    }


def paired_speedups(runs: list[Run], ref_runs: list[Run]) -> list[float | None]:
    """Per run: the reference's ms/token on the same prompt and repeat over the run's."""
    ref_by_key = {(r.prompt, r.repeat): r for r in ref_runs}
    speedups = []
    for r in runs:
        ref = ref_by_key.get((r.prompt, r.repeat))
        speedups.append(ref.ms_per_token / r.ms_per_token if ref and r.ms_per_token > 0 else None)
    return speedups


def config_summary(cfg: BenchConfig, runs: list[Run], ref_runs: list[Run], greedy_ref: list[Run],
                   num_layers: int, perplexity: float | None, peak: int | None) -> dict[str, Any]:
    """Everything results.json records for one config (see docs/results_schema.md)."""
    greedy_by_prompt = {r.prompt: r.tokens for r in greedy_ref if r.repeat == 0}
    speedups = paired_speedups(runs, ref_runs)
    first = [r for r in runs if r.repeat == 0]
    summary: dict[str, Any] = {
        "id": cfg.id, "label": cfg.label, "strategy": cfg.strategy, "options": cfg.options,
        "temperature": cfg.temperature, "greedy": cfg.greedy,
        "tokens_per_second": median([len(r.tokens) / r.seconds for r in runs if r.seconds > 0]),
        "ms_per_token": median([r.ms_per_token for r in runs]),
        "time_to_first_token": median([r.time_to_first_token for r in runs]),
        "speedup": median(speedups),
        "new_tokens": sum(len(r.tokens) for r in runs),
        "acceptance_rate": None, "mean_accepted_length": None, "accepted_length_histogram": None,
        "mean_exit_layer": None, "exit_layer_counts": None,
        "blocks_per_token": weighted_stat(runs, "blocks_per_token"),
        "head_evals_per_token": weighted_stat(runs, "head_evals_per_token"),
        "short_head_evals_per_token": weighted_stat(runs, "short_head_evals_per_token") or 0.0,
        **(fidelity(first, greedy_by_prompt) if cfg.greedy else {"token_agreement": None, "rouge_l": None,
                                                                   "exact_match": None}),
        "perplexity": perplexity,
        "peak_memory_bytes": peak,
    }
    if cfg.strategy == "ar":
        summary["blocks_per_token"] = summary["blocks_per_token"] or float(num_layers)
        summary["head_evals_per_token"] = summary["head_evals_per_token"] or 1.0
        summary["mean_exit_layer"] = float(num_layers)
    elif cfg.strategy == "ssd":
        summary.update(ssd_summary(runs, num_layers))
    elif cfg.strategy == "dee":
        summary.update(dee_summary(runs, num_layers))
        summary["mean_exit_layer"] = summary["mean_exit_layer"] or weighted_stat(runs, "mean_exit_layer")
    summary["runs"] = [
        {"prompt": r.prompt, "repeat": r.repeat, "new_tokens": len(r.tokens), "seconds": r.seconds,
         "time_to_first_token": r.time_to_first_token, "speedup": s}
        for r, s in zip(runs, speedups)
    ]
    return summary

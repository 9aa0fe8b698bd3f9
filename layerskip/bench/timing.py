"""Honest timing of generations: warm-up first, configs interleaved per prompt in rotating order
(so drift hits them alike), time.perf_counter around each generate() with the device synchronised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from layerskip.bench.settings import BenchConfig, BenchSettings, Run
from layerskip.console import log
from layerskip.decoding.base import SamplingConfig
from layerskip.device import synchronize


def timed_generate(strategy, model, ids: list[int], cfg: BenchConfig, settings: BenchSettings, seed: int,
                   prompt: int = -1, repeat: int = -1) -> Run:
    """One generation, timed from the call to the return with the device synchronised."""
    device = next(model.parameters()).device
    generator = None
    if not cfg.greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
    sampling = SamplingConfig(temperature=cfg.temperature)
    synchronize(device)
    start = time.perf_counter()
    result = strategy.generate(model, ids, settings.new_tokens, sampling=sampling, generator=generator)
    synchronize(device)
    seconds = time.perf_counter() - start
    return Run(
        prompt=prompt, repeat=repeat, tokens=list(result.tokens), seconds=seconds,
        time_to_first_token=float(result.time_to_first_token), stats=dict(result.stats),
        token_info=list(result.token_info),
    )


def measure_configs(model, prompts: list[list[int]], configs: list[BenchConfig], settings: BenchSettings,
                    progress) -> tuple[dict[str, list[Run]], dict[str, int]]:
    """Warm every config up, then time every (repeat, prompt, config), interleaving configs.

    Returns the runs per config id and, on CUDA, each config's peak allocated memory.
    """
    strategies = {c.id: c.make() for c in configs}
    device = next(model.parameters()).device
    peaks: dict[str, int] = {}
    for c in configs:
        for _ in range(settings.warmup):
            timed_generate(strategies[c.id], model, prompts[0], c, settings, seed=settings.seed)
            progress.update(1)
    runs: dict[str, list[Run]] = {c.id: [] for c in configs}
    for repeat in range(settings.repeats):
        for p, ids in enumerate(prompts):
            shift = (p + repeat) % len(configs)
            for c in configs[shift:] + configs[:shift]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                run = timed_generate(strategies[c.id], model, ids, c, settings, seed=settings.seed + 1000 * repeat + p,
                                     prompt=p, repeat=repeat)
                if device.type == "cuda":
                    peaks[c.id] = max(peaks.get(c.id, 0), torch.cuda.max_memory_allocated(device))
                runs[c.id].append(run)
                progress.update(1)
    return runs, peaks


# One decoder of a peer benchmark: (prompt ids, new tokens) -> (tokens, seconds, statistics or None).
PeerRun = Callable[[list[int], int], tuple[list[int], float, "dict[str, Any] | None"]]


def interleaved(configs: dict[str, tuple[PeerRun, dict[str, Any]]], prompts: list[list[int]], n: int,
                repeats: int) -> dict[str, dict[str, Any]]:
    """The peer benchmarks' timing: a warm-up each, then every repeat runs every decoder on each prompt in turn.

    Returns, per label: its settings, every ms/token, each prompt's tokens, the first repeat's
    statistics and the median ms/token.
    """
    results = {label: {"settings": settings, "ms_per_token": [], "tokens": [None] * len(prompts), "stats": []}
               for label, (_, settings) in configs.items()}
    for run, _ in configs.values():  # warm-up, untimed
        run(prompts[0], min(n, 8))
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            for label, (run, _) in configs.items():
                tokens, seconds, stats = run(prompt, n)
                results[label]["ms_per_token"].append(1000 * seconds / len(tokens))
                results[label]["tokens"][i] = tokens
                if r == 0 and stats:
                    results[label]["stats"].append(stats)
        log(f"repeat {r + 1}/{repeats} done")
    for entry in results.values():
        entry["median_ms_per_token"] = statistics.median(entry["ms_per_token"])
    return results

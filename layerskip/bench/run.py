"""The benchmark itself: every config on each model, then the results document.

run_bench chooses the prompts, benchmarks the main checkpoint (and the baseline), evaluates
every exit of each, and assembles the document that write_results saves as results.json.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from layerskip.bench.machine import load_average, machine_info, peak_rss_bytes, versions
from layerskip.bench.metrics import generated_perplexity
from layerskip.bench.prompts import Prompt, prompt_ids, select_prompts
from layerskip.bench.settings import BenchConfig, BenchSettings, Run, build_configs
from layerskip.bench.summaries import config_summary
from layerskip.bench.timing import measure_configs
from layerskip.checkpoint import load_checkpoint
from layerskip.console import log
from layerskip.costs import StepCosts, dee_estimate, measure_step_costs
from layerskip.data import encode_splits, find_split_files, read_lines, resolve_data_dir
from layerskip.device import decoding_threads, resolve_device
from layerskip.evaluation import evaluate_model
from layerskip.jsonfile import sanitize, write_json
from layerskip.sources import load_tokenizer, read_model_config, resolve_source
from layerskip.thresholds import model_fingerprint

RESULTS_FORMAT = "layerskip-bench"
SCHEMA_VERSION = 1
TIMING = ("time.perf_counter around each generate() call, device synchronised; warm-up runs "
          "discarded; configs interleaved per prompt in rotating order; medians over prompts")


def run_bench(
    checkpoint: str | Path,
    *,
    baseline: str | Path | None = None,
    thresholds: str | Path | Sequence[str | Path] | None = None,
    data_dir: str | Path | None = None,
    settings: BenchSettings = BenchSettings(),
    command: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark checkpoint (and baseline) and return the results document (JSON-serialisable).

    settings.threads sets torch's CPU threads for the run only; the previous value is restored.
    Without it each model decodes with ``decoding_threads`` for its size (evaluation keeps torch's).
    thresholds: one or several thresholds.json files of the checkpoint, each a calibrated DEE config.
    """
    device = resolve_device(settings.device)
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_bench(checkpoint, baseline, threshold_files(thresholds), data_dir, settings, command, progress, device)
    finally:
        torch.set_num_threads(threads_before)


def threshold_files(thresholds: str | Path | Sequence[str | Path] | None) -> tuple[str | Path, ...]:
    if thresholds is None:
        return ()
    return (thresholds,) if isinstance(thresholds, (str, Path)) else tuple(thresholds)


def _run_bench(checkpoint, baseline, thresholds: tuple[str | Path, ...], data_dir, settings: BenchSettings, command, progress: bool,
               device: torch.device) -> dict[str, Any]:
    main_tok = load_tokenizer(checkpoint)  # bad paths fail first
    if baseline is not None:
        resolve_source(baseline)
    files = find_split_files(resolve_data_dir(data_dir))
    prompts = select_prompts(read_lines(files["test"]), main_tok, settings.num_prompts, settings.prompt_tokens,
                             settings.seed)
    if len(prompts) < settings.num_prompts:
        log(f"bench: only {len(prompts)} test paragraphs are longer than {settings.prompt_tokens} tokens; "
            f"using {len(prompts)} prompts instead of {settings.num_prompts}")

    models = [("layerskip", "main", checkpoint, thresholds)]
    if baseline is not None:
        models.append(("baseline", "baseline", baseline, ()))
    total = planned_generations([(path, th) for _, _, path, th in models], settings, len(prompts))
    started = time.perf_counter()
    machine = machine_info(device)  # before the run: its load average is the background load
    with tqdm(total=total, desc="bench", unit="gen", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        results_models = [
            bench_model(name, role, path, prompts, settings, th, device, bar) for name, role, path, th in models
        ]
    machine["torch_threads"] = results_models[0]["decoding_threads"]  # what decoding ran with
    for record, (name, _, path, _) in zip(results_models, models):
        record.update(per_layer_eval(path, files, settings, device, name))
    settings_dict = asdict(settings)
    settings_dict.update({
        "device": str(device), "eos_id": None,
        "num_prompts_requested": settings.num_prompts, "num_prompts": len(prompts),  # fewer if few paragraphs fit
        "timing": TIMING,
    })
    return sanitize({
        "format": RESULTS_FORMAT, "schema_version": SCHEMA_VERSION,
        "command": list(sys.argv if command is None else command),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
        "machine": {**machine, "load_average_end": load_average()}, "versions": versions(), "settings": settings_dict,
        "prompts": [{"paragraph": p.paragraph, "text": p.text} for p in prompts],
        "models": results_models, "process_peak_rss_bytes": peak_rss_bytes(),
    })


def planned_generations(checkpoints: list[tuple[Any, Any]], settings: BenchSettings, num_prompts: int) -> int:
    """How many generate() calls the benchmark will make (for the progress bar)."""
    total = 0
    for path, thresholds in checkpoints:
        num_layers = read_model_config(path).num_layers
        configs = len(build_configs(num_layers, settings, ())) + len(thresholds)
        total += configs * (settings.warmup + settings.repeats * num_prompts)
    return total


def bench_model(name: str, role: str, checkpoint, prompts: list[Prompt], settings: BenchSettings,
                thresholds: tuple[str | Path, ...], device: torch.device, progress) -> dict[str, Any]:
    """Every config on one model: timings, fidelity, perplexity and samples."""
    ckpt = load_checkpoint(checkpoint, device=device, dtype=settings.dtype)
    model, tok = ckpt.model, ckpt.tokenizer
    num_layers = model.num_layers
    ids = [prompt_ids(p, tok, settings.prompt_tokens) for p in prompts]
    fingerprint = model_fingerprint(model) if thresholds else None
    configs = build_configs(num_layers, settings, thresholds, fingerprint)
    threads_before = torch.get_num_threads()
    threads = settings.threads or decoding_threads(model.num_parameters(), device)
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            runs, peaks = measure_configs(model, ids, configs, settings, progress)
        costs = step_costs(model, configs, settings)
    finally:
        torch.set_num_threads(threads_before)
    ar_greedy = runs["ar"]
    summaries = []
    for c in configs:
        ref = next((r for r in configs if r.strategy == "ar" and r.temperature == c.temperature), configs[0])
        summary = config_summary(c, runs[c.id], runs[ref.id], ar_greedy, num_layers,
                                 generated_perplexity(model, ids, runs[c.id]), peaks.get(c.id))
        if c.id == ref.id:
            summary["speedup"] = 1.0  # by definition; the paired ratios are all exactly 1 too
        summary.update(estimated_dee_speedup(summary, runs[c.id], costs))
        summaries.append(summary)
    samples = [
        {"config": c.id, "prompt_index": r.prompt, "prompt_text": tok.decode(ids[r.prompt]), "tokens": r.tokens,
         "pieces": [tok.id_to_piece(t) for t in r.tokens], "token_info": r.token_info, "text": tok.decode(r.tokens)}
        for c in configs for r in runs[c.id] if r.repeat == 0 and r.prompt < settings.num_samples
    ]
    return {
        "name": name, "role": role, "checkpoint": str(ckpt.path), "num_layers": num_layers,
        "num_parameters": model.num_parameters(), "decoding_threads": threads, "train": ckpt.train_config,
        "dtype": str(model.lm_head.weight.dtype),
        "configs": summaries, "samples": samples, "peak_rss_bytes": peak_rss_bytes(),
        "step_costs": costs.to_dict() if costs else None,
    }


def step_costs(model, configs: list[BenchConfig], settings: BenchSettings) -> StepCosts | None:
    """Each piece of a decoding step, timed mid-generation; checks read the calibrated config's exit
    head if there is one, else the sweep's (--exit_vocab)."""
    if not settings.cost_repeats:
        return None
    calibrated = next((c for c in configs if c.options.get("calibrated")), None)
    check_vocab = calibrated.options.get("exit_vocab") if calibrated else settings.exit_vocab
    position = min(settings.prompt_tokens + settings.new_tokens // 2, model.config.max_seq_len - 1)
    return measure_step_costs(model, check_vocab=check_vocab, position=position, repeats=settings.cost_repeats)


def estimated_dee_speedup(summary: dict[str, Any], runs: list[Run], costs: StepCosts | None) -> dict[str, Any]:
    """The cost model's speed-up for a softmax DEE config whose checks read the measured exit head
    (layerskip.costs.dee_estimate), with and without the checks' cost; null for other configs."""
    options = summary["options"]
    applies = (costs is not None and summary["strategy"] == "dee" and options.get("measure") == "softmax"
               and options.get("exit_vocab") == costs.check_vocab and summary.get("exit_layer_counts"))
    if not applies:
        return {"estimated_speedup": None, "estimated_speedup_free_checks": None}
    estimate = dee_estimate(costs, summary["exit_layer_counts"], runs[0].stats.get("checked_layers"))
    return {"estimated_speedup": estimate.speedup, "estimated_speedup_free_checks": estimate.speedup_free_checks}


def per_layer_eval(checkpoint, files: dict[str, Path], settings: BenchSettings, device: torch.device,
                   name: str) -> dict[str, Any]:
    """Loss, token/word perplexity and agreement with the last layer of every exit on the test split
    (or its first eval_tokens)."""
    if settings.eval_tokens == 0:
        return {"per_layer": None, "per_layer_split": None, "per_layer_tokens": None}
    ckpt = load_checkpoint(checkpoint, device=device, dtype=settings.dtype)
    splits = encode_splits(ckpt.tokenizer, files)
    tokens, words = splits.tokens["test"], splits.words["test"]
    seq_len = int(ckpt.train_config.get("seq_len", ckpt.model_config.max_seq_len))
    n = len(tokens) - 1 if settings.eval_tokens is None else min(len(tokens) - 1, settings.eval_tokens)
    log(f"bench: evaluating every exit of {name} on {n:,} test tokens ...")
    result = evaluate_model(ckpt.model, tokens, split="test", words=words, seq_len=seq_len,
                            max_tokens=settings.eval_tokens)
    log(f"bench: evaluated {name} in {result.seconds:.1f} s")
    rows = [{"exit_layer": r.layer, "loss": r.loss, "token_ppl": r.token_ppl, "word_ppl": r.word_ppl,
             "agreement": r.agreement, "last_in_top2": r.last_in_top2, "last_in_top4": r.last_in_top4}
            for r in result.layers]
    return {"per_layer": rows, "per_layer_split": "test", "per_layer_tokens": result.tokens}


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the results document (strict JSON, atomically)."""
    return write_json(path, results, flag="--out")

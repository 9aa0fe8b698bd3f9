"""Benchmark the decoding strategies of one or two checkpoints -> one results.json document.

For each model (the LayerSkip checkpoint and an optional plain baseline), the same fixed,
seeded prompts (the first ``prompt_tokens`` tokens of randomly chosen paragraphs of the
WikiText-2 test split) are decoded by:

- ``ar``: autoregressive greedy, the reference every other config is compared with, and
  autoregressive sampling at ``temperature`` (the reference for sampled SSD's speed-up);
- ``dee``: dynamic early exit with calibrated thresholds (``--thresholds``) and a sweep of
  global thresholds for each confidence measure;
- ``ssd``: self-speculative decoding for every draft layer E and draft length k (greedy),
  and one sampled config.

Honest timing: every config is warmed up first; configs are interleaved (for each prompt,
every config in a rotating order) so drift hits them alike; each generation is timed with
``time.perf_counter`` (synchronising the GPU); reports are medians over prompts. Speed-up is
the median of paired per-prompt ratios ``AR ms/token / config ms/token`` against the same
model's AR at the same temperature, so AR's own speed-up is exactly 1.

The results document (``format: "layerskip-bench"``, ``schema_version: 1``)::

    command, created, machine{cpu, cores, torch_threads, device, gpu, platform},
    versions{python, torch, layerskip, numpy}, settings{...}, process_peak_rss_bytes,
    prompts[{paragraph, text}],
    models[{name, role, checkpoint, num_layers, num_parameters, train, peak_rss_bytes,
            per_layer[{exit_layer, loss, token_ppl, word_ppl}] | null, per_layer_split,
            configs[{id, label, strategy, options, temperature, greedy,
                     tokens_per_second, ms_per_token, time_to_first_token (s), speedup,
                     new_tokens, acceptance_rate, mean_accepted_length,
                     accepted_length_histogram [count of rounds accepting 0, 1, ... drafts],
                     mean_exit_layer, exit_layer_counts [tokens exiting after 1..L blocks],
                     blocks_per_token, head_evals_per_token (full LM head),
                     short_head_evals_per_token (the short head of --draft_vocab / --exit_vocab),
                     token_agreement (pooled over tokens), rouge_l (mean over prompts),
                     exact_match (share of prompts) against AR greedy, greedy configs only,
                     perplexity (of the generated tokens under the full model),
                     peak_memory_bytes (GPU only),
                     estimated_speedup, estimated_speedup_free_checks (softmax DEE: the
                     step_costs model for its exit histogram),
                     runs[{prompt, repeat, new_tokens, seconds, time_to_first_token, speedup}]}],
            step_costs{ar_step, block, full_head, check, propagate, rest (microseconds),
                       num_layers, position, check_vocab, repeats, threads} | null,
            samples[{config, prompt_index, prompt_text, tokens, pieces, token_info, text}]}]

Values that do not apply to a config (acceptance for DEE, ...) are null.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from layerskip import __version__
from layerskip.config import MEASURES
from layerskip.costs import StepCosts, dee_estimate, measure_step_costs
from layerskip.device import resolve_device
from layerskip.errors import ConfigError, DataError
from layerskip.jsonfile import sanitize, write_json
from layerskip.tokenizer import Tokenizer

RESULTS_FORMAT = "layerskip-bench"
SCHEMA_VERSION = 1
# Global thresholds swept per measure, from permissive (early exits) to strict (near full depth).
DEFAULT_DEE_THRESHOLDS = {
    "softmax": (0.5, 0.7, 0.9, 0.97),
    "margin": (0.3, 0.5, 0.8, 0.95),
    "saturation": (0.8, 0.9, 0.95, 0.99),
}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchSettings:
    num_prompts: int = 16
    prompt_tokens: int = 32
    new_tokens: int = 64
    seed: int = 0
    repeats: int = 1
    warmup: int = 1
    draft_layers: tuple[int, ...] | None = None  # None: a spread over 1..L-1
    ks: tuple[int, ...] = (2, 4, 6)
    dee_measures: tuple[str, ...] = MEASURES
    dee_thresholds: tuple[float, ...] | None = None  # None: DEFAULT_DEE_THRESHOLDS per measure
    temperature: float = 0.8  # for the sampled AR and SSD configs; 0 skips them
    sample_draft_layer: int | None = None  # None: the middle of the draft layers
    sample_k: int | None = None  # None: the middle of ks
    draft_vocab: int | None = None  # SSD drafts through a short head of this many tokens (None: full head)
    exit_vocab: int | None = None  # the DEE sweep's early exits read a short head (None: full head)
    num_samples: int = 3  # prompts whose generations are stored for the report
    eval_tokens: int | None = None  # per-layer evaluation on this many test tokens (None: all, 0: skip)
    device: str = "cpu"
    threads: int | None = None
    cost_repeats: int = 300  # timed repetitions of each decoding-step piece (layerskip.costs); 0 skips them

    def __post_init__(self) -> None:
        for name in ("num_prompts", "prompt_tokens", "new_tokens", "repeats"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not self.ks or any(not (isinstance(k, int) and k >= 1) for k in self.ks):
            raise ConfigError(f"ks (draft lengths) must be integers >= 1, got {self.ks!r}")
        bad = [m for m in self.dee_measures if m not in MEASURES]
        if bad:
            raise ConfigError(f"unknown DEE measure(s) {bad}; choose from {list(MEASURES)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be >= 0 (0 skips the sampled configs), got {self.temperature!r}")
        for name, least in (("draft_vocab", 1), ("exit_vocab", 2)):  # as SelfSpeculative / DynamicEarlyExit
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= least):
                raise ConfigError(f"{name} must be an integer >= {least} (tokens in the short head), got {value!r}")
        if not (isinstance(self.cost_repeats, int) and self.cost_repeats >= 0):
            raise ConfigError(f"cost_repeats must be an integer >= 0 (0 skips the step costs), got {self.cost_repeats!r}")
        if self.eval_tokens is not None and not (isinstance(self.eval_tokens, int) and self.eval_tokens >= 0):
            raise ConfigError(
                f"eval_tokens must be an integer >= 0 (0 skips the per-layer evaluation, None reads the whole "
                f"test split), got {self.eval_tokens!r}"
            )

    def draft_layers_for(self, num_layers: int) -> list[int]:
        if self.draft_layers is None:
            spread = {1, num_layers // 3, num_layers // 2, (2 * num_layers) // 3}
            return sorted(e for e in spread if 1 <= e < num_layers)
        bad = [e for e in self.draft_layers if not 1 <= e < num_layers]
        if bad:
            raise ConfigError(f"draft layers {bad} are outside 1..{num_layers - 1} for a {num_layers}-layer model")
        return sorted(set(self.draft_layers))


@dataclass
class BenchConfig:
    """One decoding configuration: how to build its strategy and how to label it."""

    id: str
    strategy: str  # "ar" | "dee" | "ssd"
    label: str
    options: dict[str, Any]
    temperature: float = 0.0
    make: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Run:
    """One timed generation."""

    prompt: int
    repeat: int
    tokens: list[int]
    seconds: float
    time_to_first_token: float
    stats: dict[str, Any]
    token_info: list[dict[str, Any]]

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / max(len(self.tokens), 1)


@dataclass
class Prompt:
    paragraph: int  # line number in the test split
    text: str  # the paragraph line, as in the file


# ----------------------------------------------------------------------------- prompts


def is_paragraph(line: str) -> bool:
    s = line.strip()
    return bool(s) and not (s.startswith("=") and s.endswith("="))


def select_prompts(lines: Sequence[str], tokenizer, settings: BenchSettings) -> list[Prompt]:
    """Seeded random paragraphs of the test split long enough for a prompt plus one token."""
    candidates = [
        i for i, line in enumerate(lines)
        if is_paragraph(line) and len(tokenizer.encode(line)) > settings.prompt_tokens
    ]
    if not candidates:
        raise DataError(
            f"no paragraph of the test split has more than {settings.prompt_tokens} tokens; "
            "lower --prompt_tokens"
        )
    rng = random.Random(settings.seed)
    chosen = rng.sample(candidates, min(settings.num_prompts, len(candidates)))
    return [Prompt(paragraph=i, text=lines[i]) for i in chosen]


def prompt_ids(prompt: Prompt, tokenizer, prompt_tokens: int) -> list[int]:
    return tokenizer.encode(prompt.text)[:prompt_tokens]


# ----------------------------------------------------------------------------- fidelity


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 over tokens: the harmonic mean of LCS precision and recall."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- configs


def build_configs(num_layers: int, settings: BenchSettings, thresholds_path: str | Path | None,
                  fingerprint: str | None = None) -> list[BenchConfig]:
    """AR, DEE (calibrated + sweep) and SSD (greedy sweep + sampled) for a num_layers model.

    fingerprint: the model's (calibrate.model_fingerprint); a thresholds file calibrated for
    other weights is refused, since its guarantee would not carry over.
    """
    from layerskip.generate.autoregressive import Autoregressive
    from layerskip.generate.dee import DynamicEarlyExit
    from layerskip.generate.ssd import SelfSpeculative

    configs = [BenchConfig("ar", "ar", "AR greedy", {}, 0.0, Autoregressive)]
    t = settings.temperature
    if t > 0:
        configs.append(BenchConfig(f"ar-t{t:g}", "ar", f"AR sampled T={t:g}", {}, t, Autoregressive))
    if thresholds_path is not None:
        configs.append(calibrated_config(thresholds_path, num_layers, fingerprint))
    xv, dv = settings.exit_vocab, settings.draft_vocab
    xv_label, dv_label = ("" if v is None else f" head {v}" for v in (xv, dv))
    for measure in settings.dee_measures:
        for th in settings.dee_thresholds or DEFAULT_DEE_THRESHOLDS[measure]:
            configs.append(BenchConfig(
                f"dee-{measure}-{th:g}", "dee", f"DEE {measure} ≥ {th:g}{xv_label}",
                {"measure": measure, "thresholds": th, "calibrated": False, "exit_vocab": xv},
                0.0, lambda m=measure, th=th: DynamicEarlyExit(thresholds=th, measure=m, exit_vocab=xv),
            ))
    draft_layers = settings.draft_layers_for(num_layers)
    for e in draft_layers:
        for k in settings.ks:
            configs.append(BenchConfig(
                f"ssd-E{e}-k{k}", "ssd", f"SSD E={e} k={k}{dv_label}", {"draft_layer": e, "k": k, "draft_vocab": dv},
                0.0, lambda e=e, k=k: SelfSpeculative(draft_layer=e, k=k, draft_vocab=dv),
            ))
    if t > 0 and draft_layers:
        e = settings.sample_draft_layer or draft_layers[len(draft_layers) // 2]
        k = settings.sample_k or settings.ks[len(settings.ks) // 2]
        if not 1 <= e < num_layers:
            raise ConfigError(f"sample draft layer {e} is outside 1..{num_layers - 1}")
        configs.append(BenchConfig(
            f"ssd-E{e}-k{k}-t{t:g}", "ssd", f"SSD E={e} k={k}{dv_label} sampled T={t:g}",
            {"draft_layer": e, "k": k, "draft_vocab": dv}, t, lambda e=e, k=k: SelfSpeculative(draft_layer=e, k=k,
                                                                                          draft_vocab=dv),
        ))
    return configs


def calibrated_config(path: str | Path, num_layers: int, fingerprint: str | None) -> BenchConfig:
    """The DEE config of a thresholds.json written by `layerskip calibrate`."""
    from layerskip.thresholds import load_thresholds

    th = load_thresholds(path, num_layers, fingerprint=fingerprint)
    risk = th.record.get("risk") or {}
    options = {
        "measure": th.measure, "thresholds": list(th.thresholds), "min_exit_layer": th.min_exit_layer,
        "check_every": th.check_every, "exit_vocab": th.exit_vocab, "calibrated": True, "source": str(path),
        "delta": th.delta,
        "epsilon": th.epsilon, "calibration_test_disagreement": risk.get("test_disagreement"),
    }
    label = (f"DEE calibrated ({th.measure}" + (f", δ={th.delta:g}" if th.delta is not None else "")
             + (f", head {th.exit_vocab}" if th.exit_vocab is not None else "") + ")")
    return BenchConfig("dee-calibrated", "dee", label, options, 0.0, th.strategy)


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(strategy, model, ids: list[int], cfg: BenchConfig, settings: BenchSettings, seed: int,
                   prompt: int = -1, repeat: int = -1) -> Run:
    """One generation, timed from the call to the return with the device synchronised."""
    from layerskip.generate.base import SamplingConfig

    device = next(model.parameters()).device
    generator = None
    if not cfg.greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
    sampling = SamplingConfig(temperature=cfg.temperature)
    synchronize(device)
    start = time.perf_counter()
    result = strategy.generate(model, ids, settings.new_tokens, sampling=sampling, eos_id=None, generator=generator)
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


# ----------------------------------------------------------------------------- summaries


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


def config_summary(cfg: BenchConfig, runs: list[Run], ref_runs: list[Run], greedy_ref: list[Run],
                   num_layers: int, perplexity: float | None, peak: int | None) -> dict[str, Any]:
    ref_by_key = {(r.prompt, r.repeat): r for r in ref_runs}
    greedy_by_prompt = {r.prompt: r.tokens for r in greedy_ref if r.repeat == 0}
    speedups = []
    for r in runs:
        ref = ref_by_key.get((r.prompt, r.repeat))
        speedups.append(ref.ms_per_token / r.ms_per_token if ref and r.ms_per_token > 0 else None)
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


def fidelity(runs: list[Run], reference: dict[int, list[int]]) -> dict[str, float | None]:
    """Agreement with AR greedy: token agreement pooled over all tokens, mean ROUGE-L, exact-match rate."""
    if not runs:
        return {"token_agreement": None, "rouge_l": None, "exact_match": None}
    positions = sum(max(len(r.tokens), len(reference[r.prompt])) for r in runs)
    same = sum(sum(a == b for a, b in zip(r.tokens, reference[r.prompt])) for r in runs)
    return {
        "token_agreement": same / positions if positions else 1.0,
        "rouge_l": statistics.fmean(rouge_l(r.tokens, reference[r.prompt]) for r in runs),
        "exact_match": sum(r.tokens == reference[r.prompt] for r in runs) / len(runs),
    }


@torch.no_grad()
def generated_perplexity(model, prompts: list[list[int]], runs: list[Run]) -> float | None:
    """exp(mean NLL) of the generated tokens (first repeat) under the full model, given their prompt."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for r in runs:
        if r.repeat != 0 or not r.tokens:
            continue
        ids = prompts[r.prompt] + r.tokens
        x = torch.tensor([ids[:-1]], device=device)
        logits = model(x).logits[0, len(prompts[r.prompt]) - 1 :].float()  # (new, V)
        target = torch.tensor(r.tokens, device=device)
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(r.tokens)
    return math.exp(nll / count) if count else None


# ----------------------------------------------------------------------------- per-layer eval


def per_layer_eval(checkpoint, files: dict[str, Path], settings: BenchSettings, device: torch.device,
                   name: str) -> dict[str, Any]:
    """Loss and token/word perplexity of every exit on the test split (or its first eval_tokens)."""
    from layerskip.checkpoint import load_checkpoint
    from layerskip.data import encode_splits
    from layerskip.evaluate import evaluate_model

    if settings.eval_tokens == 0:
        return {"per_layer": None, "per_layer_split": None, "per_layer_tokens": None}
    ckpt = load_checkpoint(checkpoint, device=device)
    splits = encode_splits(ckpt.tokenizer, files)
    tokens, words = splits.tokens["test"], splits.words["test"]
    seq_len = int(ckpt.train_config.get("seq_len", ckpt.model_config.max_seq_len))
    n = len(tokens) - 1 if settings.eval_tokens is None else min(len(tokens) - 1, settings.eval_tokens)
    log(f"bench: evaluating every exit of {name} on {n:,} test tokens ...")
    result = evaluate_model(ckpt.model, tokens, split="test", words=words, seq_len=seq_len,
                            max_tokens=settings.eval_tokens)
    log(f"bench: evaluated {name} in {result.seconds:.1f} s")
    rows = [{"exit_layer": r.layer, "loss": r.loss, "token_ppl": r.token_ppl, "word_ppl": r.word_ppl}
            for r in result.layers]
    return {"per_layer": rows, "per_layer_split": "test", "per_layer_tokens": result.tokens}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def planned_generations(checkpoints: list[tuple[Any, Any]], settings: BenchSettings, num_prompts: int) -> int:
    """How many generate() calls the benchmark will make (for the progress bar)."""
    from layerskip.checkpoint import read_config, resolve_checkpoint_dir

    total = 0
    for path, thresholds in checkpoints:
        num_layers = read_config(resolve_checkpoint_dir(path))["model"]["num_layers"]
        configs = len(build_configs(num_layers, settings, None)) + (thresholds is not None)
        total += configs * (settings.warmup + settings.repeats * num_prompts)
    return total


# ----------------------------------------------------------------------------- machine


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
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "load_average": load_average(),  # other work on the machine skews timings; see also load_average_end
    }
    return info


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, str]:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "layerskip": __version__,
            "numpy": numpy.__version__}


# ----------------------------------------------------------------------------- the benchmark


def bench_model(name: str, role: str, checkpoint, prompts: list[Prompt], settings: BenchSettings,
                thresholds: str | Path | None, device: torch.device, progress) -> dict[str, Any]:
    """Every config on one model: timings, fidelity, perplexity and samples."""
    from layerskip.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device=device)
    model, tok = ckpt.model, ckpt.tokenizer
    num_layers = model.num_layers
    ids = [prompt_ids(p, tok, settings.prompt_tokens) for p in prompts]
    fingerprint = None
    if thresholds is not None:
        from layerskip.thresholds import model_fingerprint

        fingerprint = model_fingerprint(model)
    configs = build_configs(num_layers, settings, thresholds, fingerprint)
    with torch.inference_mode():
        runs, peaks = measure_configs(model, ids, configs, settings, progress)
    costs = step_costs(model, configs, settings)
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
        "num_parameters": model.num_parameters(), "train": ckpt.train_config,
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


def run_bench(
    checkpoint: str | Path,
    *,
    baseline: str | Path | None = None,
    thresholds: str | Path | None = None,
    data_dir: str | Path | None = None,
    settings: BenchSettings = BenchSettings(),
    command: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark checkpoint (and baseline) and return the results document (JSON-serialisable).

    settings.threads sets torch's CPU threads for the run only; the previous value is restored.
    """
    device = resolve_device(settings.device)
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_bench(checkpoint, baseline, thresholds, data_dir, settings, command, progress, device)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(checkpoint, baseline, thresholds, data_dir, settings: BenchSettings, command, progress: bool,
               device: torch.device) -> dict[str, Any]:
    from tqdm import tqdm

    from layerskip.checkpoint import TOKENIZER_FILE, resolve_checkpoint_dir
    from layerskip.data import find_split_files, read_lines, resolve_data_dir

    main_tok = Tokenizer.load(resolve_checkpoint_dir(checkpoint) / TOKENIZER_FILE)  # bad paths fail first
    if baseline is not None:
        resolve_checkpoint_dir(baseline)
    files = find_split_files(resolve_data_dir(data_dir))
    test_lines = read_lines(files["test"])
    prompts = select_prompts(test_lines, main_tok, settings)
    if len(prompts) < settings.num_prompts:
        log(f"bench: only {len(prompts)} test paragraphs are longer than {settings.prompt_tokens} tokens; "
            f"using {len(prompts)} prompts instead of {settings.num_prompts}")

    models = [("layerskip", "main", checkpoint, thresholds)]
    if baseline is not None:
        models.append(("baseline", "baseline", baseline, None))
    total = planned_generations([(path, th) for _, _, path, th in models], settings, len(prompts))
    started = time.perf_counter()
    machine = machine_info(device)  # before the run: its load average is the background load
    with tqdm(total=total, desc="bench", unit="gen", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        results_models = [
            bench_model(name, role, path, prompts, settings, th, device, bar) for name, role, path, th in models
        ]
    for record, (name, _, path, _) in zip(results_models, models):
        record.update(per_layer_eval(path, files, settings, device, name))
    settings_dict = asdict(settings)
    settings_dict.update({
        "device": str(device), "eos_id": None,
        "num_prompts_requested": settings.num_prompts, "num_prompts": len(prompts),  # fewer if few paragraphs fit
        "timing": "time.perf_counter around each generate() call, device synchronised; warm-up runs "
                  "discarded; configs interleaved per prompt in rotating order; medians over prompts",
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


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the results document (strict JSON, atomically)."""
    return write_json(path, results, flag="--out")

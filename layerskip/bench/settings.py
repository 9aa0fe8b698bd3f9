"""What `layerskip bench` runs: its settings, and the decoding configs they expand to.

BenchSettings holds the validated options; build_configs turns them into the AR, DEE and SSD
configs of one model, each with a label, its options (as recorded) and a strategy factory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerskip.config import GLOBAL_MEASURES, MEASURES
from layerskip.decoding.autoregressive import Autoregressive
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.decoding.ssd import SelfSpeculative
from layerskip.errors import ConfigError
from layerskip.thresholds import load_thresholds

# Global thresholds swept per measure, from permissive (early exits) to strict (near full depth).
DEFAULT_DEE_THRESHOLDS = {
    "softmax": (0.5, 0.7, 0.9, 0.97),
    "margin": (0.3, 0.5, 0.8, 0.95),
    "saturation": (0.8, 0.9, 0.95, 0.99),
}


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
    dee_measures: tuple[str, ...] = GLOBAL_MEASURES  # "classifier" needs a thresholds file (--thresholds)
    dee_thresholds: tuple[float, ...] | None = None  # None: DEFAULT_DEE_THRESHOLDS per measure
    temperature: float = 0.8  # for the sampled AR and SSD configs; 0 skips them
    sample_draft_layer: int | None = None  # None: the middle of the draft layers
    sample_k: int | None = None  # None: the middle of ks
    draft_vocab: int | None = None  # SSD drafts through a short head of this many tokens (None: full head)
    exit_vocab: int | None = None  # the DEE sweep's early exits read a short head (None: full head)
    num_samples: int = 3  # prompts whose generations are stored for the report
    eval_tokens: int | None = None  # per-layer evaluation on this many test tokens (None: all, 0: skip)
    device: str = "cpu"
    dtype: str = "auto"  # the models' weights: float32, bfloat16, float16, or auto (layerskip.dtypes)
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
        bad = [m for m in self.dee_measures if m not in GLOBAL_MEASURES]
        if bad:
            learned = " (the classifier measure needs its calibrated file: --thresholds FILE)" \
                if set(bad) <= set(MEASURES) else ""
            raise ConfigError(f"DEE measure(s) {bad} cannot be swept with global thresholds{learned}; choose from "
                              f"{list(GLOBAL_MEASURES)}")
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


def build_configs(num_layers: int, settings: BenchSettings, thresholds_paths: Sequence[str | Path] = (),
                  fingerprint: str | None = None) -> list[BenchConfig]:
    """AR, DEE (calibrated + sweep) and SSD (greedy sweep + sampled) for a num_layers model.

    thresholds_paths: thresholds.json files, one calibrated DEE config each ("dee-calibrated",
    then "dee-calibrated-2", ...). fingerprint: the model's (calibrate.model_fingerprint); a
    thresholds file calibrated for other weights is refused, since its guarantee would not carry over.
    """
    configs = ar_configs(settings.temperature)
    for number, path in enumerate(thresholds_paths, 1):
        configs.append(calibrated_config(path, num_layers, fingerprint, number))
    configs += dee_sweep(settings)
    configs += ssd_configs(num_layers, settings)
    return configs


def ar_configs(temperature: float) -> list[BenchConfig]:
    """AR greedy (every config's reference) and, for temperature > 0, AR sampled."""
    configs = [BenchConfig("ar", "ar", "AR greedy", {}, 0.0, Autoregressive)]
    if temperature > 0:
        t = temperature
        configs.append(BenchConfig(f"ar-t{t:g}", "ar", f"AR sampled T={t:g}", {}, t, Autoregressive))
    return configs


def dee_sweep(settings: BenchSettings) -> list[BenchConfig]:
    """DEE with one global threshold, for every measure and threshold swept."""
    xv = settings.exit_vocab
    head = "" if xv is None else f" head {xv}"
    return [
        BenchConfig(
            f"dee-{measure}-{th:g}", "dee", f"DEE {measure} ≥ {th:g}{head}",
            {"measure": measure, "thresholds": th, "calibrated": False, "exit_vocab": xv},
            0.0, lambda m=measure, th=th: DynamicEarlyExit(thresholds=th, measure=m, exit_vocab=xv),
        )
        for measure in settings.dee_measures
        for th in settings.dee_thresholds or DEFAULT_DEE_THRESHOLDS[measure]
    ]


def ssd_configs(num_layers: int, settings: BenchSettings) -> list[BenchConfig]:
    """Greedy SSD for every draft layer E and draft length k, then one sampled SSD config."""
    t, dv = settings.temperature, settings.draft_vocab
    head = "" if dv is None else f" head {dv}"

    def ssd(e: int, k: int, temperature: float, suffix: str) -> BenchConfig:
        return BenchConfig(
            f"ssd-E{e}-k{k}{suffix}", "ssd", f"SSD E={e} k={k}{head}", {"draft_layer": e, "k": k, "draft_vocab": dv},
            temperature, lambda: SelfSpeculative(draft_layer=e, k=k, draft_vocab=dv),
        )

    draft_layers = settings.draft_layers_for(num_layers)
    configs = [ssd(e, k, 0.0, "") for e in draft_layers for k in settings.ks]
    if t > 0 and draft_layers:
        e = settings.sample_draft_layer or draft_layers[len(draft_layers) // 2]
        k = settings.sample_k or settings.ks[len(settings.ks) // 2]
        if not 1 <= e < num_layers:
            raise ConfigError(f"sample draft layer {e} is outside 1..{num_layers - 1}")
        sampled = ssd(e, k, t, f"-t{t:g}")
        sampled.label += f" sampled T={t:g}"
        configs.append(sampled)
    return configs


def calibrated_config(path: str | Path, num_layers: int, fingerprint: str | None, number: int = 1) -> BenchConfig:
    """The DEE config of a thresholds.json written by `layerskip calibrate`."""
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
    name = "dee-calibrated" if number == 1 else f"dee-calibrated-{number}"
    return BenchConfig(name, "dee", label, options, 0.0, th.strategy)

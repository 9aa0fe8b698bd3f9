"""Decoding strategies behind one interface (see base.py): autoregressive, self-speculative, early exit.

    strategy = make_strategy("ssd", draft_layer=3, k=4)
    result = strategy.generate(model, prompt_ids, 100, sampling=SamplingConfig(temperature=0.8),
                               generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from typing import Any

from layerskip.decoding.autoregressive import Autoregressive
from layerskip.decoding.base import GenerationResult, SamplingConfig, Strategy, check_prompt, sampling_probs
from layerskip.decoding.dee import DynamicEarlyExit
from layerskip.decoding.ssd import SelfSpeculative
from layerskip.errors import ConfigError

STRATEGIES: dict[str, Any] = {"ar": Autoregressive, "ssd": SelfSpeculative, "dee": DynamicEarlyExit}
MODES = tuple(STRATEGIES)

__all__ = [
    "MODES",
    "Autoregressive",
    "DynamicEarlyExit",
    "GenerationResult",
    "SamplingConfig",
    "SelfSpeculative",
    "Strategy",
    "check_prompt",
    "make_strategy",
    "sampling_probs",
]


def make_strategy(mode: str, **options: Any) -> Strategy:
    """A strategy by name: "ar" (no options), "ssd" (draft_layer, k, adaptive_threshold), "dee" (its own).

    Unknown modes and options are ConfigErrors naming what is valid.
    """
    if mode not in STRATEGIES:
        raise ConfigError(f"unknown generation mode {mode!r}; choose one of {', '.join(MODES)}")
    try:
        return STRATEGIES[mode](**options)
    except TypeError as exc:  # an unknown or missing keyword
        raise ConfigError(f"bad options for mode {mode!r}: {exc}") from None

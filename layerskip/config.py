"""Configuration dataclasses, validated on creation.

Unknown keys are errors (a misspelt option must never be silently ignored), and every
check says which value is wrong and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from layerskip.errors import ConfigError

T = TypeVar("T")

# Dynamic early exit's confidence measures, each in [0, 1] (see layerskip.decoding.measures);
# "classifier" reads weights a calibration fits, so it needs a thresholds file.
MEASURES = ("softmax", "margin", "saturation", "classifier")
GLOBAL_MEASURES = MEASURES[:3]  # need no fitted weights, so one global threshold (--conf) can use them
MEASURE_RANGE = (0.0, 1.0)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_measure(measure: str) -> str:
    """The measure itself, or a ConfigError naming the valid ones."""
    _require(measure in MEASURES, f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")
    return measure


def from_dict(cls: type[T], data: dict[str, Any], *, what: str | None = None) -> T:
    """Build a config dataclass from a dict, refusing keys the class does not have."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what or cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {what or cls.__name__} option(s) {unknown}; valid options are {sorted(known)}"
        )
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, rotary positions, SwiGLU, no biases.

    Defaults are the seed study's model (d_model 128, 6 layers, 8 heads, d_ff 512).
    Every field maps onto a Hugging Face ``LlamaConfig`` field, so the model can be
    exported exactly.
    """

    vocab_size: int = 8192
    d_model: int = 128
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: same as num_heads (no grouped-query attention)
    d_ff: int = 512
    dropout: float = 0.1
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        _require(
            self.d_model % self.num_heads == 0,
            f"num_heads ({self.num_heads}) must divide d_model ({self.d_model}); "
            f"try num_heads in {[h for h in range(1, 33) if self.d_model % h == 0]}",
        )
        _require(
            self.head_dim % 2 == 0,
            f"the head dimension d_model/num_heads = {self.head_dim} must be even for rotary "
            "positions; choose num_heads so that d_model/num_heads is even",
        )
        kv = self.kv_heads
        _require(
            isinstance(kv, int) and kv >= 1 and self.num_heads % kv == 0,
            f"num_kv_heads ({self.num_kv_heads}) must be a positive divisor of num_heads ({self.num_heads})",
        )
        _require(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"{name} must be a positive number, got {value!r}",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, what="model config")


@dataclass(frozen=True)
class TokenizerConfig:
    """SentencePiece settings; the tokenizer cache is keyed by these."""

    vocab_size: int = 8192
    model_type: str = "bpe"  # "bpe" or "unigram"
    character_coverage: float = 1.0
    byte_fallback: bool = True  # characters never seen in training become bytes, never <unk>

    def __post_init__(self) -> None:
        _require(
            isinstance(self.vocab_size, int) and 300 <= self.vocab_size <= 65535,
            f"tokenizer vocab_size must be an integer in [300, 65535], got {self.vocab_size!r}",
        )
        _require(
            self.model_type in ("bpe", "unigram"),
            f"tokenizer model_type must be 'bpe' or 'unigram', got {self.model_type!r}",
        )
        _require(
            0.9 <= self.character_coverage <= 1.0,
            f"character_coverage must be in [0.9, 1.0], got {self.character_coverage!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        return from_dict(cls, data, what="tokenizer config")

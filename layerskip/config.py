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


ROPE_TYPES = ("linear", "llama3")  # rotary scalings the model implements (Hugging Face's names)


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequencies stretched for contexts longer than pre-training's, as Hugging Face's rope types do.

    linear: every frequency divided by ``factor``. llama3 (Llama 3.1 / 3.2): wavelengths longer
    than original_max_position_embeddings / low_freq_factor divided by ``factor``, those shorter
    than original_max_position_embeddings / high_freq_factor kept, a smooth blend in between.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self) -> None:
        _require(self.rope_type in ROPE_TYPES, f"rope scaling type {self.rope_type!r} is not supported; "
                 f"layerskip implements {', '.join(ROPE_TYPES)} (and plain rotary positions)")
        _require(_positive_number(self.factor), f"rope scaling factor must be a positive number, got {self.factor!r}")
        llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if self.rope_type == "linear":
            given = [name for name in llama3 if getattr(self, name) is not None]
            _require(not given, f"linear rope scaling takes only a factor, not {given}")
            return
        for name in llama3:
            _require(_positive_number(getattr(self, name)),
                     f"llama3 rope scaling needs a positive {name}, got {getattr(self, name)!r}")
        _require(self.low_freq_factor < self.high_freq_factor,  # type: ignore[operator]
                 f"llama3 rope scaling needs low_freq_factor ({self.low_freq_factor}) < high_freq_factor "
                 f"({self.high_freq_factor})")
        _require(isinstance(self.original_max_position_embeddings, int),
                 f"original_max_position_embeddings must be an integer, got {self.original_max_position_embeddings!r}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, rotary positions, SwiGLU, no biases.

    Defaults are the seed study's model (d_model 128, 6 layers, 8 heads, d_ff 512).
    Every field maps onto a Hugging Face ``LlamaConfig`` field, so the model can be
    exported exactly. ``head_dim`` None means d_model / num_heads (then stored resolved);
    ``rope_scaling`` None means plain rotary positions.
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
    head_dim: int = None  # type: ignore[assignment]  # None on input: d_model // num_heads
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        self._resolve_head_dim()
        if isinstance(self.rope_scaling, dict):  # as read from JSON
            object.__setattr__(self, "rope_scaling", from_dict(RopeScaling, self.rope_scaling, what="rope_scaling"))
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                 f"rope_scaling must be null or an object, got {self.rope_scaling!r}")
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

    def _resolve_head_dim(self) -> None:
        """An explicit head_dim, or d_model / num_heads (which must then divide evenly); even for rotary."""
        if self.head_dim is None:
            _require(
                self.d_model % self.num_heads == 0,
                f"num_heads ({self.num_heads}) must divide d_model ({self.d_model}); "
                f"try num_heads in {[h for h in range(1, 33) if self.d_model % h == 0]}",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        _require(isinstance(self.head_dim, int) and not isinstance(self.head_dim, bool) and self.head_dim >= 1,
                 f"head_dim must be a positive integer, got {self.head_dim!r}")
        _require(
            self.head_dim % 2 == 0,
            f"the head dimension ({self.head_dim}) must be even for rotary positions; "
            "choose num_heads so that d_model/num_heads is even",
        )

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Every field, except head_dim when it is d_model / num_heads and rope_scaling when there is none:
        a plain model's dict is what layerskip wrote before these fields existed."""
        data = dataclasses.asdict(self)
        if self.head_dim * self.num_heads == self.d_model:
            del data["head_dim"]
        if self.rope_scaling is None:
            del data["rope_scaling"]
        return data

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

"""What a training run is given and what it gives back.

``TrainConfig`` (validated on creation, stored in every checkpoint), how a saved config is
read back and which of its settings a resume may change, ``TrainResult`` and ``TrainingDiverged``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerskip.config import ModelConfig, TokenizerConfig, from_dict
from layerskip.errors import ConfigError, LayerskipError
from layerskip.losses import CURRICULA, EXIT_WEIGHTINGS, LAYER_DROPOUT_SCHEDULES, TIME_RAMPS

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "muon")


class TrainingDiverged(LayerskipError):
    """The loss became NaN or infinite."""


def _req(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in every checkpoint it writes.

    Defaults train the LayerSkip model; ``max_skip_prob=0, early_exit_scale=0`` is plain
    training (the baseline). Stopping: the first of ``epochs``, ``max_steps`` and
    ``time_budget`` (minutes) reached; with none of them, one epoch.
    """

    # model (the tokenizer's vocabulary is the model's)
    d_model: int = 128
    num_layers: int = 6
    num_heads: int = 8
    d_ff: int = 512
    dropout: float = 0.0  # not the seed's 0.1: attention dropout leaves SDPA's fused path, slowing every step
    vocab_size: int = 8192
    tokenizer_type: str = "bpe"
    seq_len: int = 256
    # optimisation; tuned on short plain runs: small models want many steps, so small batches
    batch_size: int = 16
    lr: float = 8e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    # "muon": Muon (orthogonalised momentum) for the blocks' matrices, AdamW for the rest;
    # it reached a lower validation perplexity than AdamW in the same number of steps.
    optimizer: str = "muon"
    grad_clip: float = 1.0
    epochs: int | None = None
    max_steps: int | None = None
    time_budget: float | None = None  # minutes, for the whole run including validation
    seed: int = 0
    # continual training: the checkpoint whose weights, tokenizer and shape the run started from
    # (recorded as an absolute path; None: weights seeded from `seed`)
    init_from: str | None = None
    # LayerSkip
    max_skip_prob: float = 0.1
    layer_dropout_schedule: str = "linear"
    layer_dropout_ramp: str = "constant"
    early_exit_scale: float = 1.0
    # The scale at the schedule's last step, reached linearly from early_exit_scale (None: constant):
    # exits trained hard early, then the last layer given the end of the run.
    early_exit_scale_end: float | None = None
    # uniform (every early exit e_scale) or the paper's depth (k(k+1)/2); see losses.exit_weights.
    # uniform with distillation 0.9 won the recipe search (docs/results.md).
    early_exit_weighting: str = "uniform"
    early_exit_curriculum: str = "rotational"
    early_exit_rotation: int = 2
    early_exit_gradual_steps: int | None = None  # None: the whole run
    # The early exits that get a loss when the curriculum enables them (None: every block's);
    # the blocks after the last of them are free of the early-exit loss's pull.
    early_exit_layers: tuple[int, ...] | None = None
    # Fraction of tokens the early (not last) exits' loss is estimated on: their LM-head work
    # dominates a small model's LayerSkip step.
    early_exit_tokens: float = 0.25
    # Self-distillation: each early exit's loss is (1 - W) x cross-entropy + W x T^2 x KL(last
    # layer's distribution at temperature T, a constant || the exit's at T); 0: cross-entropy only.
    # Inert when early_exit_scale is 0 (no early exit is trained).
    early_exit_distill: float = 0.9
    early_exit_distill_temperature: float = 1.0
    # Whether the early exits' loss trains the shared final norm and LM head (tied embeddings still
    # learn as inputs); False: only the last layer's loss trains them, and the early exits learn to read them.
    early_exit_trains_head: bool = True
    # Each early-exit token's loss weighted by the last layer's top-1 probability to this power,
    # normalised to mean 1 (0: every token alike): the exits train where they could ever exit.
    # It lost on every column of the recipe search's eleventh round (docs/results.md).
    early_exit_focus: float = 0.0
    # speed
    precision: str = "bf16"
    compile: bool = True
    loss_chunk: int = 4096
    # validation and checkpoints
    val_every: int = 0  # steps; 0: at the end of each epoch only
    val_tokens: int | None = 65536  # validate on the first N valid tokens (None: all); `eval` reads all
    eval_batch_size: int = 16
    save_every: int = 50  # steps between last/ checkpoints
    log_every: int = 1

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_ranges()
        self._check_choices()
        self.model_config(self.vocab_size)  # model shape errors surface now
        self.tokenizer_config()

    def _check_counts(self) -> None:
        for name in ("d_model", "num_layers", "num_heads", "d_ff", "seq_len", "batch_size",
                     "eval_batch_size", "loss_chunk", "early_exit_rotation", "save_every", "log_every"):
            v = getattr(self, name)
            _req(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        for name in ("epochs", "max_steps", "val_tokens", "early_exit_gradual_steps"):
            v = getattr(self, name)
            _req(v is None or (isinstance(v, int) and v >= 1), f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup", "val_every", "seed"):
            v = getattr(self, name)
            _req(isinstance(v, int) and v >= 0, f"{name} must be a non-negative integer, got {v!r}")

    def _check_ranges(self) -> None:
        _req(self.time_budget is None or (math.isfinite(self.time_budget) and self.time_budget > 0),
             f"time_budget must be a positive number of minutes, got {self.time_budget!r}")
        _req(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr!r}")
        _req(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _req(0 <= self.weight_decay < 1, f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        _req(0 < self.beta2 < 1, f"beta2 must be in (0, 1), got {self.beta2!r}")
        _req(self.grad_clip >= 0, f"grad_clip must be >= 0 (0: off), got {self.grad_clip!r}")
        _req(0 < self.early_exit_tokens <= 1,
             f"early_exit_tokens must be a fraction in (0, 1], got {self.early_exit_tokens!r}")
        _req(0 <= self.max_skip_prob <= 1, f"max_skip_prob must be in [0, 1], got {self.max_skip_prob!r}")
        _req(self.early_exit_scale >= 0 and math.isfinite(self.early_exit_scale),
             f"early_exit_scale must be >= 0 (0: plain training loss), got {self.early_exit_scale!r}")
        end = self.early_exit_scale_end
        _req(end is None or (isinstance(end, (int, float)) and end >= 0 and math.isfinite(end)),
             f"early_exit_scale_end must be >= 0 or None (constant scale), got {end!r}")
        self._check_exit_layers()
        _req(isinstance(self.early_exit_trains_head, bool),
             f"early_exit_trains_head must be true or false, got {self.early_exit_trains_head!r}")
        focus = self.early_exit_focus
        _req(isinstance(focus, (int, float)) and not isinstance(focus, bool) and math.isfinite(focus) and focus >= 0,
             f"early_exit_focus must be a power >= 0 (0: every token alike), got {focus!r}")
        self._check_distillation()
        _req(self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
             f"init_from must be a checkpoint path or None, got {self.init_from!r}")

    def _check_exit_layers(self) -> None:
        layers = self.early_exit_layers
        if layers is None:
            return
        _req(isinstance(layers, (list, tuple)) and len(layers) > 0 and all(
            isinstance(k, int) and not isinstance(k, bool) and 1 <= k < self.num_layers for k in layers),
             f"early_exit_layers must name early exits 1..{self.num_layers - 1} (the last block's exit is "
             f"always trained), got {layers!r}")
        object.__setattr__(self, "early_exit_layers", tuple(sorted(set(layers))))  # as JSON reads it back

    def _check_distillation(self) -> None:
        w, t = self.early_exit_distill, self.early_exit_distill_temperature
        _req(isinstance(w, (int, float)) and 0 <= w <= 1,
             f"early_exit_distill must be a weight in [0, 1] (0: cross-entropy only), got {w!r}")
        _req(isinstance(t, (int, float)) and math.isfinite(t) and t > 0,
             f"early_exit_distill_temperature must be a positive number, got {t!r}")

    def _check_choices(self) -> None:
        choices = (("layer_dropout_schedule", LAYER_DROPOUT_SCHEDULES), ("layer_dropout_ramp", TIME_RAMPS),
                   ("early_exit_curriculum", CURRICULA), ("early_exit_weighting", EXIT_WEIGHTINGS),
                   ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                   ("tokenizer_type", ("bpe", "unigram")))
        for name, allowed in choices:
            _req(getattr(self, name) in allowed, f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                           num_heads=self.num_heads, d_ff=self.d_ff, dropout=self.dropout, max_seq_len=self.seq_len)

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(vocab_size=self.vocab_size, model_type=self.tokenizer_type)

    @property
    def plain(self) -> bool:
        """No layer dropout and no early-exit loss: the baseline."""
        return self.max_skip_prob == 0 and self.early_exit_scale == 0 and not self.early_exit_scale_end

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data, what="training config")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# What runs saved before a setting existed were trained with, where its default changed since.
SAVED_BEFORE_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "early_exit_distill": 0.0,
                                         "early_exit_distill_temperature": 1.0, "early_exit_weighting": "depth"}


def saved_train_config(data: dict[str, Any]) -> TrainConfig:
    """The training config a checkpoint records, read as the run that wrote it was trained."""
    if isinstance(data, dict):
        data = {**SAVED_BEFORE_DEFAULTS, **data}
    return TrainConfig.from_dict(data)


# Settings that may differ when resuming: they change when to stop or what is logged, not
# the losses of the steps that are run.
RESUME_OVERRIDABLE = frozenset({"epochs", "max_steps", "time_budget", "val_every", "val_tokens",
                                "eval_batch_size", "save_every", "log_every"})


@dataclass
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    step: int
    stopped: str  # "max_steps" | "epochs" | "time_budget" | "stop_at_step"
    losses: list[float] = field(default_factory=list)  # train loss of every step run in this call
    val: Any = None  # the last EvalResult

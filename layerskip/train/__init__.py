"""The training loop: WikiText-2 -> a run directory with best/ and last/ checkpoints.

One step: sample the per-sample layer-dropout mask, run the trunk once collecting the
hidden states of the exits the curriculum enables, and take the weighted early-exit loss
of those exits through the shared head (``layerskip.losses``). Muon for the blocks'
matrices and AdamW for the rest (or AdamW alone), linear warm-up + cosine decay, gradient
clipping; optional bf16 autocast and ``torch.compile`` of each block separately (compiling
the whole model while the exit set changes between steps silently dropped exit losses on
torch 2.13 CPU; per-block compilation does not, and a test checks it).

Everything random is derived from the seed, so a run is reproducible, and the trainer state
saved with each checkpoint (optimizer, RNG, step, data position, estimated total steps)
makes ``resume`` continue with exactly the losses an uninterrupted run would have had.

Run directory::

    RUN/metrics.jsonl   one JSON record per line: {"type": "train"|"val"|"end", "step": ...}
    RUN/best/           checkpoint with the lowest final-layer validation loss
    RUN/last/           latest checkpoint, with trainer_state.pt for resuming
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layerskip.config import ModelConfig, TokenizerConfig, from_dict
from layerskip.device import keep_freed_memory, resolve_device
from layerskip.errors import ConfigError, LayerskipError
from layerskip.losses import (
    CURRICULA,
    chunk_nll_and_grads,
    LAYER_DROPOUT_SCHEDULES,
    TIME_RAMPS,
    enabled_exits,
    exit_loss,
    exit_weights,
    layer_dropout_probs,
    lr_at,
    sample_layer_keep,
)
from layerskip.model import Transformer

METRICS_FILE = "metrics.jsonl"
# Under a time budget the schedule's length is re-measured every PACE_STEPS steps: step times
# drift over a run (a 20-minute run here slowed from 0.56 to 0.70 s/step), and a length fixed from
# the first steps left the cosine decay 17% short of its end when the budget ran out.
PACE_STEPS = 50
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
    dropout: float = 0.0  # 0.1 (the seed's) costs 1.3-1.6x a step: attention dropout leaves SDPA's fused path
    vocab_size: int = 8192
    tokenizer_type: str = "bpe"
    seq_len: int = 256
    # optimisation
    # 5-minute plain runs here (final validation loss): batch 32 at lr 2e-3 5.21, at 4e-3 5.08;
    # batch 16 at 2e-3 4.95, at 3e-3 4.88; batch 8 at 2e-3 5.04. Small models want many steps.
    # Then at batch 16 (validation word perplexity): lr 3e-3 476, 5e-3 412, 8e-3 392.
    batch_size: int = 16
    lr: float = 8e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    # "muon": Muon (orthogonalised momentum) for the blocks' matrices, AdamW for the rest.
    # Interleaved 5-minute plain runs at lr 8e-3 (validation word perplexity): Muon 274, AdamW
    # 372 at the same ~515 steps; Muon at lr 4e-3 315, at 1.2e-2 282.
    optimizer: str = "muon"
    grad_clip: float = 1.0
    epochs: int | None = None
    max_steps: int | None = None
    time_budget: float | None = None  # minutes, for the whole run including validation
    seed: int = 0
    # LayerSkip
    max_skip_prob: float = 0.1
    layer_dropout_schedule: str = "linear"
    layer_dropout_ramp: str = "constant"
    early_exit_scale: float = 1.0
    early_exit_curriculum: str = "rotational"
    early_exit_rotation: int = 2
    early_exit_gradual_steps: int | None = None  # None: the whole run
    # Fraction of tokens the early (not last) exits' loss is estimated on: at 0.25 a 5-minute
    # LayerSkip run stepped at 1.2x a plain step (2.0 s vs 1.15 s per step with every token).
    early_exit_tokens: float = 0.25
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
        for name in ("d_model", "num_layers", "num_heads", "d_ff", "seq_len", "batch_size",
                     "eval_batch_size", "loss_chunk", "early_exit_rotation", "save_every", "log_every"):
            v = getattr(self, name)
            _req(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        for name in ("epochs", "max_steps", "val_tokens", "early_exit_gradual_steps"):
            v = getattr(self, name)
            _req(v is None or (isinstance(v, int) and v >= 1), f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup", "val_every", "seed"):
            v = getattr(self, name)
            _req(isinstance(v, int) and v >= 0, f"{name} must be a non-negative integer, got {v!r}")
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
        for name, allowed in (("layer_dropout_schedule", LAYER_DROPOUT_SCHEDULES), ("layer_dropout_ramp", TIME_RAMPS),
                              ("early_exit_curriculum", CURRICULA), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                              ("tokenizer_type", ("bpe", "unigram"))):
            _req(getattr(self, name) in allowed, f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        self.model_config(self.vocab_size)  # model shape errors surface now
        self.tokenizer_config()

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                           num_heads=self.num_heads, d_ff=self.d_ff, dropout=self.dropout, max_seq_len=self.seq_len)

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(vocab_size=self.vocab_size, model_type=self.tokenizer_type)

    @property
    def plain(self) -> bool:
        """No layer dropout and no early-exit loss: the baseline."""
        return self.max_skip_prob == 0 and self.early_exit_scale == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data, what="training config")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# What runs saved before a setting existed were trained with, where its default changed since.
SAVED_BEFORE_DEFAULTS: dict[str, Any] = {"optimizer": "adamw"}


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


# ----------------------------------------------------------------------------- devices, precision


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the step


class ExitLossModel(nn.Module):
    """Trunk + weighted early-exit loss in one forward, so DDP sees every parameter's use."""

    def __init__(self, model: Transformer, chunk_size: int, *, compile_loss: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # the head + loss of one chunk, compiled on its own (like each block) when asked
        self.chunk_fn = torch.compile(chunk_nll_and_grads, dynamic=True) if compile_loss else chunk_nll_and_grads

    def forward(
        self,
        idx: torch.Tensor,  # (B, T)
        targets: torch.Tensor,  # (B, T)
        exits: list[int],
        weights: list[float],
        keep: torch.Tensor | None,  # (L, B) bool
        early_positions: torch.Tensor | None = None,  # (n,) flat token indices for the early exits
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss, per-exit mean NLL): the last exit over every token, the earlier ones
        over `early_positions` only when given (an unbiased, cheaper estimate of their loss)."""
        out = self.model(idx, exits=exits, layer_keep=keep, compute_logits=False)
        flat_targets = targets.flatten()
        if early_positions is None or len(exits) == 1:
            hidden = torch.stack([out.exit_hidden[k] for k in exits])  # (E, B, T, C)
            normed = self.model.norm(hidden).flatten(1, 2)  # (E, B*T, C)
            return self._loss(normed, flat_targets, weights)
        early = torch.stack([out.exit_hidden[k].flatten(0, 1).index_select(0, early_positions) for k in exits[:-1]])
        early_loss, early_nll = self._loss(self.model.norm(early), flat_targets.index_select(0, early_positions),
                                           weights[:-1])
        last = self.model.norm(out.exit_hidden[exits[-1]]).flatten(0, 1).unsqueeze(0)  # (1, B*T, C)
        last_loss, last_nll = self._loss(last, flat_targets, weights[-1:])
        return early_loss + last_loss, torch.cat([early_nll, last_nll])

    def _loss(self, normed: torch.Tensor, targets: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        return exit_loss(normed, self.model.lm_head.weight, targets, weights, chunk_size=self.chunk_size,
                         chunk_fn=self.chunk_fn)


def sample_early_positions(batch_size: int, seq_len: int, fraction: float,
                           generator: torch.Generator) -> torch.Tensor | None:
    """(B, m) sorted random positions in each sequence, m = round(fraction * seq_len) (None: all).

    The early exits' loss is an auxiliary term; estimating it on a random quarter of the
    tokens costs a quarter of their LM-head work, which dominates a small model's step. The
    same count in every row keeps the mean over a rank's rows equal to the global mean's
    share, so processes under torchrun reproduce one process.
    """
    if fraction >= 1.0:
        return None
    count = max(1, round(fraction * seq_len))
    return torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :count].sort(dim=1).values


def flat_positions(rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, m) positions within rows -> (B*m,) indices into the flattened (B*T) tokens."""
    offsets = torch.arange(rows.shape[0]).unsqueeze(1) * seq_len
    return (rows + offsets).flatten()


def step_plan(cfg: TrainConfig, step: int, total_steps: int) -> tuple[list[int], list[float], list[float]]:
    """(enabled exits, their weights, per-block skip probabilities) at `step`."""
    L = cfg.num_layers
    if cfg.early_exit_scale == 0:
        exits = [L]
    else:
        exits = enabled_exits(cfg.early_exit_curriculum, step, L, rotation=cfg.early_exit_rotation,
                              gradual_steps=cfg.early_exit_gradual_steps or total_steps)
    weights = exit_weights(exits, L, cfg.early_exit_scale)
    probs = layer_dropout_probs(L, cfg.max_skip_prob, cfg.layer_dropout_schedule, step=step,
                                total_steps=total_steps, ramp=cfg.layer_dropout_ramp)
    return exits, weights, probs


class OptimizerGroup:
    """Several optimizers stepped as one: the Trainer sets the LR of every param group, steps,
    zeroes and checkpoints them together."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ConfigError(f"the saved optimizer state holds {sorted(state)}, this run uses "
                              f"{sorted(self.optimizers)}; resume with the optimizer the run started with")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer | OptimizerGroup:
    """AdamW, weight decay on matrices only; the fused kernel where there is one.

    On CPU the default per-parameter AdamW took 1.4 s a step for the default model (hundreds
    of small ops, each paying thread start-up), the fused one 18 ms.

    With ``optimizer="muon"``, the blocks' matrices go to torch's Muon instead, its update
    scaled to AdamW's RMS ("match_rms_adamw") so the same LR and weight decay apply; the
    embedding (tied to the head) and the norms stay with AdamW, as Muon's authors advise.
    """
    block_matrices = {id(p) for p in model.layers.parameters() if p.dim() == 2}
    decay, no_decay, muon = [], [], []
    for p in model.parameters():
        if cfg.optimizer == "muon" and id(p) in block_matrices:
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = model.embed_tokens.weight.device.type in ("cpu", "cuda")
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused or None)
    if cfg.optimizer == "adamw":
        return adamw
    return OptimizerGroup({
        "adamw": adamw,
        "muon": torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
    })


def compile_blocks(model: Transformer) -> None:
    """Compile each block on its own (never the whole model: see the module docstring)."""
    for block in model.layers:
        block.compile(dynamic=True)


# ----------------------------------------------------------------------------- data order


class BatchOrder:
    """Which windows of the train split make up each batch: a pure function of (seed, epoch).

    Each epoch shifts the window grid by a random offset and shuffles the windows; a rank
    of `world` takes its own slice of every global batch.
    """

    def __init__(self, num_tokens: int, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.num_tokens, self.seq_len, self.batch_size = num_tokens, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.steps_per_epoch = (num_tokens - 1 - seq_len) // seq_len // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the train split has {num_tokens:,} tokens, too few for one batch of {batch_size} x {seq_len}; "
                "lower --batch_size or --seq_len"
            )
        self._epoch, self._starts = -1, np.empty(0, dtype=np.int64)

    def starts(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
            n = (self.num_tokens - 1 - offset) // self.seq_len
            perm = torch.randperm(n, generator=g).numpy()
            self._epoch, self._starts = epoch, offset + perm.astype(np.int64) * self.seq_len
        return self._starts

    def batch(self, tokens: np.ndarray, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B / world, T), of global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        starts = self.starts(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        per_rank = self.batch_size // self.world
        starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        rows = np.stack([tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------- processes


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Read torchrun's environment; start a process group (gloo on CPU, NCCL on CUDA) if world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    info = DistInfo(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def _all_agree(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any (so all ranks stop together)."""
    if info.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world == 1:
        return value
    import torch.distributed as dist

    value = value.detach().clone().cpu()
    dist.all_reduce(value)
    return value / info.world


def _from_rank0(value: int, info: DistInfo) -> int:
    if info.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- run directory


def run_dir_state(out_dir: Path) -> str:
    """'empty' (absent or empty), 'run' (holds a run) or 'other' (files that are not a run)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a directory for the run")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "empty"
    markers = (METRICS_FILE, "last", "best", ".last.old")
    return "run" if any((out_dir / m).exists() for m in markers) else "other"


def prepare_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check what --out holds against --resume/--overwrite; True when resuming."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    state = run_dir_state(out_dir)
    if resume:
        from layerskip.checkpoint import _recover_interrupted_swap

        for name in ("last", "best"):
            _recover_interrupted_swap(out_dir / name)
        for stale in out_dir.glob(".*.tmp-*"):  # a checkpoint write cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
        if not (out_dir / "last" / "trainer_state.pt").is_file():
            raise ConfigError(f"--resume: {out_dir} holds no resumable run (no last/trainer_state.pt); "
                              "drop --resume to start a new run")
        return True
    if state == "run" and not overwrite:
        raise ConfigError(f"{out_dir} already holds a training run; pass --resume to continue it "
                          "or --overwrite to replace it")
    if state == "other" and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose another --out or pass --overwrite to replace it")
    if state != "empty":
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return False


def resume_config(out_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The saved config of the run in out_dir, with settings that only change when to stop."""
    from layerskip.checkpoint import read_config, resolve_checkpoint_dir

    saved = saved_train_config(read_config(resolve_checkpoint_dir(Path(out_dir) / "last"))["train"])
    changes = {k: v for k, v in (overrides or {}).items() if getattr(saved, k, object()) != v}
    refused = sorted(set(changes) - RESUME_OVERRIDABLE)
    if refused:
        raise ConfigError(
            f"--resume continues the saved run, whose {', '.join(f'{k}={getattr(saved, k)!r}' for k in refused)} "
            f"differ from what was given; only {sorted(RESUME_OVERRIDABLE)} may change. Start a new run instead"
        )
    return saved.replace(**changes)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint being resumed from (a killed run's tail)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class _Metrics:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------- the loop


def _step_seed(seed: int, step: int, stream: int) -> int:
    """Independent seeds per (seed, step, stream): dropout (stream = rank), layer skipping (-1)
    and the early-exit loss positions (-2)."""
    return ((seed * 1_000_003 + step) * 1_009 + stream + 7) % (2**62)


@dataclass
class StepStats:
    loss: float
    exits: list[int]
    exit_losses: list[float]
    lr: float
    grad_norm: float | None
    seconds: float


class Trainer:
    """One training run; `run()` trains until a stop condition and returns a TrainResult."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, *, data_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, device: str = "auto", progress: bool = True,
                 stop_at_step: int | None = None, corpus: Any = None) -> None:
        self.cfg, self.out_dir, self.progress, self.stop_at_step = cfg, out_dir, progress, stop_at_step
        self.device = resolve_device(device)
        keep_freed_memory()  # CPU steps ~8% faster: no page faults on every step's large blocks
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {self.dist.world} processes")
        if self.dist.main:
            prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
        _barrier(self.dist)
        self.resuming = resume
        self.state = self._load_resume_state() if resume else None
        self.corpus = corpus or self._load_corpus(data_dir)
        self._build_model()
        self.order = BatchOrder(len(self.corpus.tokens["train"]), cfg.seq_len, cfg.batch_size, cfg.seed,
                                self.dist.rank, self.dist.world)
        self.step = self.state["step"] if self.state else 0
        self.best_val = self.state["best_val"] if self.state else math.inf
        self.prior_elapsed = self.state["elapsed"] if self.state else 0.0
        self.total_steps, self.total_fixed = self._total_steps()
        self.val_seconds: float | None = None  # of the last validation
        self.val_estimate = 0.0

    # -- set-up -------------------------------------------------------------------------

    def _load_resume_state(self) -> dict[str, Any]:
        from layerskip.checkpoint import load_checkpoint, load_trainer_state

        state = load_trainer_state(self.out_dir / "last")
        ckpt = load_checkpoint(self.out_dir / "last")
        saved = saved_train_config(ckpt.train_config)
        differ = [k for k in saved.to_dict() if k not in RESUME_OVERRIDABLE and getattr(saved, k) != getattr(self.cfg, k)]
        if differ:
            raise ConfigError(f"--resume: the saved run has {', '.join(f'{k}={getattr(saved, k)!r}' for k in differ)}; "
                              "resume with the saved settings (see resume_config) or start a new run")
        self.resume_ckpt, self.saved_cfg = ckpt, saved
        return state

    def _load_corpus(self, data_dir: str | Path | None):
        from layerskip.data import load_corpus

        tokenizer = self.resume_ckpt.tokenizer if self.state else None
        if not self.dist.main:
            _barrier(self.dist)  # rank 0 trains and caches the tokenizer first
        corpus = load_corpus(data_dir, self.cfg.tokenizer_config(), tokenizer=tokenizer)
        if self.dist.main:
            _barrier(self.dist)
        return corpus

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        vocab = self.corpus.tokenizer.vocab_size
        self.model = Transformer(cfg.model_config(vocab))
        # checkpoints carry the training split's token counts (they rank the short decoding head)
        self.model.set_token_counts(torch.from_numpy(np.bincount(self.corpus.tokens["train"], minlength=vocab)))
        if self.state:
            self.model.load_state_dict(self.resume_ckpt.model.state_dict())
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, cfg)
        if self.state:
            self.optimizer.load_state_dict(self.state["optimizer"])
        if cfg.compile:
            from torch import _dynamo

            # one compiled variant per block, train and eval mode: more than the default limit
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            compile_blocks(self.model)
        module: nn.Module = ExitLossModel(self.model, cfg.loss_chunk, compile_loss=cfg.compile)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, find_unused_parameters=cfg.max_skip_prob > 0,
                                             device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.module = module

    def _total_steps(self) -> tuple[int, bool]:
        cfg, spe = self.cfg, self.order.steps_per_epoch
        limits_of = lambda c: (c.epochs, c.max_steps, c.time_budget)  # noqa: E731
        if self.state and limits_of(self.saved_cfg) == limits_of(cfg):
            # the same schedule as if never stopped (unless it was never fixed: stopped too early)
            return int(self.state["total_steps"]), bool(self.state.get("total_fixed", True))
        if cfg.time_budget is None:
            return (spe if not (cfg.epochs or cfg.max_steps) else self._step_limit()), True
        return self._step_limit(), False  # fixed once step times are measured

    # -- one step -----------------------------------------------------------------------

    def train_step(self, step: int) -> StepStats:
        cfg, dev, start = self.cfg, self.device, time.perf_counter()
        exits, weights, probs = step_plan(cfg, step, self.total_steps)
        torch.manual_seed(_step_seed(cfg.seed, step, self.dist.rank))  # nn.Dropout's stream
        keep = None
        if cfg.max_skip_prob > 0:
            per_rank = cfg.batch_size // self.dist.world
            mask = sample_layer_keep(probs, cfg.batch_size, torch.Generator().manual_seed(_step_seed(cfg.seed, step, -1)))
            keep = mask[:, self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank].to(dev)  # (L, B/world)
        x, y = self.order.batch(self.corpus.tokens["train"], step)
        positions = sample_early_positions(cfg.batch_size, cfg.seq_len, cfg.early_exit_tokens,
                                           torch.Generator().manual_seed(_step_seed(cfg.seed, step, -2)))
        if positions is not None:  # drawn for the global batch like the skip mask; this rank's rows
            per_rank = cfg.batch_size // self.dist.world
            positions = flat_positions(positions[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank],
                                       cfg.seq_len)
        lr = lr_at(step, base_lr=cfg.lr, warmup=cfg.warmup, total_steps=self.total_steps, min_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast_context(cfg, dev):
            loss, per_exit = self.module(x.to(dev), y.to(dev), exits, weights, keep,
                                         None if positions is None else positions.to(dev))
        shared = _mean_across(torch.cat([loss.detach().float().reshape(1), per_exit.float()]).cpu(), self.dist)
        loss_value = float(shared[0])
        if not math.isfinite(loss_value):
            raise TrainingDiverged(self._diverged_message(step, f"the loss became {loss_value}"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(self._diverged_message(step, f"the gradient norm became {grad_norm}"))
        self.optimizer.step()
        return StepStats(loss_value, exits, [float(v) for v in shared[1:]], lr, grad_norm, time.perf_counter() - start)

    def _diverged_message(self, step: int, what: str) -> str:
        last = self.out_dir / "last"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
        return (f"training stopped at step {step + 1}: {what}; {kept}. Lower --lr (now {self.cfg.lr}) or "
                "--max_skip_prob, or use --precision fp32, and start again")

    # -- validation and checkpoints ------------------------------------------------------

    def validate(self) -> Any:
        from layerskip.evaluate import evaluate_model

        cfg = self.cfg
        # Compiled blocks would compile again for no-grad eval mode; eager costs little here.
        eager = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
        with eager:
            result = evaluate_model(self.model, self.corpus.tokens["valid"], split="valid",
                                    words=self.corpus.words["valid"],
                                    seq_len=cfg.seq_len, batch_size=cfg.eval_batch_size, max_tokens=cfg.val_tokens,
                                    chunk_size=cfg.loss_chunk)
        self.val_seconds = result.seconds
        return result

    def save(self, which: str, val_loss: float | None = None) -> Path:
        from layerskip.checkpoint import save_checkpoint

        cfg, step = self.cfg, self.step
        meta = {"step": step, "epoch": step / self.order.steps_per_epoch, "val_loss": val_loss,
                "plain": cfg.plain, "world_size": self.dist.world}
        state = None
        if which == "last":
            state = {
                "version": 1,
                "step": step,
                "total_steps": self.total_steps,
                "total_fixed": self.total_fixed,
                "optimizer": self.optimizer.state_dict(),
                "best_val": self.best_val,
                "elapsed": self.elapsed(),
                "data_position": {"epoch": step // self.order.steps_per_epoch,
                                  "batch_in_epoch": step % self.order.steps_per_epoch},
                # the curriculum, layer-dropout schedule and every random draw are functions of
                # (seed, step, total_steps); these record what the next step will use
                "curriculum": {"name": cfg.early_exit_curriculum, "next_exits": step_plan(cfg, step, self.total_steps)[0]},
                "rng": {"scheme": "per-step seeds", "seed": cfg.seed, "torch": torch.get_rng_state()},
            }
        return save_checkpoint(self.out_dir / which, self.model, self.corpus.tokenizer,
                               tokenizer_config=cfg.tokenizer_config(), train_config=cfg.to_dict(), meta=meta,
                               trainer_state=state)

    def elapsed(self) -> float:
        return self.prior_elapsed + time.perf_counter() - self.start_time

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from tqdm import tqdm

        cfg, main, spe = self.cfg, self.dist.main, self.order.steps_per_epoch
        if self.resuming and main:
            _truncate_metrics(self.out_dir / METRICS_FILE, self.step)
        metrics = _Metrics(self.out_dir / METRICS_FILE, main)
        self.start_time = time.perf_counter()
        bar = tqdm(total=self.total_steps if self.total_fixed else None, initial=self.step, file=sys.stderr,
                   disable=not (self.progress and main), unit="step", dynamic_ncols=True)
        if main:
            metrics.write({"type": "start", "step": self.step, "resumed": self.resuming, "config": cfg.to_dict(),
                           "world_size": self.dist.world, "device": str(self.device),
                           "steps_per_epoch": spe, "torch": torch.__version__})
        losses: list[float] = []
        val, val_step, stopped = None, -1, "max_steps"
        # pace is timed from a few steps in (past compilation); None until then
        pace_start_step, pace_from = self.step + 3, None
        tokens_per_step = cfg.batch_size * cfg.seq_len
        try:
            while True:
                stopped = self._stop_reason()
                if stopped:
                    break
                if self.step == pace_start_step:
                    pace_from = (self.step, time.perf_counter())
                stats = self.train_step(self.step)
                self.step += 1
                losses.append(stats.loss)
                if pace_from and self.step - pace_from[0] >= (PACE_STEPS if self.total_fixed else 10):
                    now = time.perf_counter()
                    if cfg.time_budget is not None:
                        self._fix_total_steps((now - pace_from[1]) / (self.step - pace_from[0]))
                        bar.total = self.total_steps
                    pace_from = (self.step, now)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tokens_per_step / stats.seconds:,.0f}")
                if main and (self.step % cfg.log_every == 0 or self.step == 1):
                    metrics.write({"type": "train", "step": self.step, "epoch": self.step / spe, "loss": stats.loss,
                                   "exits": stats.exits, "exit_losses": stats.exit_losses, "lr": stats.lr,
                                   "grad_norm": stats.grad_norm, "step_seconds": stats.seconds,
                                   "tokens_per_s": tokens_per_step / stats.seconds, "elapsed": self.elapsed()})
                if self.step % spe == 0 or (cfg.val_every and self.step % cfg.val_every == 0):
                    val, val_step = self._validate_and_save(metrics), self.step
                    pace_from = pace_from and (self.step, time.perf_counter())  # validations are not steps
                elif self.step % cfg.save_every == 0 and main:
                    self.save("last")
            if stopped != "stop_at_step" and val_step != self.step and self.step > 0:
                val = self._validate_and_save(metrics)
            elif main and val_step != self.step:
                self.save("last")
        finally:
            bar.close()
        if main:
            metrics.write({"type": "end", "step": self.step, "stopped": stopped, "elapsed": self.elapsed(),
                           "best_val_loss": self.best_val})
        metrics.close()
        _barrier(self.dist)
        return TrainResult(run_dir=self.out_dir, best=self.out_dir / "best", last=self.out_dir / "last",
                           step=self.step, stopped=stopped, losses=losses, val=val)

    def _stop_reason(self) -> str:
        cfg = self.cfg
        if self.stop_at_step is not None and self.step >= self.stop_at_step:
            return "stop_at_step"
        if self.step >= self.total_steps:
            if cfg.max_steps and self.step >= cfg.max_steps:
                return "max_steps"
            if cfg.epochs and self.step >= cfg.epochs * self.order.steps_per_epoch:
                return "epochs"
            return "time_budget" if cfg.time_budget else "epochs"
        if cfg.time_budget is not None:
            reserve = self.val_seconds if self.val_seconds is not None else self.val_estimate
            if _all_agree(self.elapsed() + reserve >= cfg.time_budget * 60, self.dist):
                return "time_budget"
        return ""

    def _fix_total_steps(self, step_seconds: float) -> None:
        """Under a time budget: as many steps as fit in the time left, leaving room for validations.
        Called again as the pace is re-measured, so the schedule ends when the budget does."""
        cfg = self.cfg
        remaining = cfg.time_budget * 60 - self.elapsed()
        val_tokens = min(cfg.val_tokens or len(self.corpus.tokens["valid"]), len(self.corpus.tokens["valid"]))
        # before the first validation is timed: no backward pass, but all L exits through the head,
        # so a validation batch costs about one step
        val_cost = self.val_seconds or step_seconds * val_tokens / (cfg.batch_size * cfg.seq_len)
        steps_left = remaining / step_seconds
        validations = 1 + steps_left / self.order.steps_per_epoch + (steps_left / cfg.val_every if cfg.val_every else 0)
        fit = int((remaining - validations * val_cost) / step_seconds)
        self.val_estimate = val_cost
        total = max(self.step + 1, min(self._step_limit(), self.step + fit))
        self.total_steps = _from_rank0(total, self.dist)  # every rank must run the same schedule
        self.total_fixed = True

    def _step_limit(self) -> int:
        """The most steps --epochs / --max_steps allow (a time budget alone allows any number)."""
        cfg = self.cfg
        limits = [n for n in (cfg.epochs and cfg.epochs * self.order.steps_per_epoch, cfg.max_steps) if n]
        return min(limits) if limits else 10**9

    def _validate_and_save(self, metrics: _Metrics) -> Any:
        if not self.dist.main:
            _barrier(self.dist)
            return None
        val = self.validate()
        final = val.final.loss
        improved = final < self.best_val
        metrics.write({"type": "val", "step": self.step, "epoch": self.step / self.order.steps_per_epoch,
                       "split": val.split, "tokens": val.tokens, "seconds": val.seconds, "improved": improved,
                       "layers": [dataclasses.asdict(r) for r in val.layers], "elapsed": self.elapsed()})
        if improved:
            self.best_val = final
            self.save("best", val_loss=final)
        self.save("last", val_loss=final)
        _barrier(self.dist)
        return val


def train(cfg: TrainConfig, out_dir: str | Path, *, data_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto", progress: bool = True, stop_at_step: int | None = None,
          corpus: Any = None) -> TrainResult:
    """Train into out_dir (RUN/best, RUN/last, RUN/metrics.jsonl); see TrainConfig for the settings.

    resume: continue the run in out_dir (cfg must equal its saved config, see resume_config).
    stop_at_step: stop after this many steps as if interrupted (last/ is saved, no validation).
    corpus: an already loaded ``layerskip.data.Corpus`` (skips locating and encoding the data).
    """
    return Trainer(cfg, Path(out_dir), data_dir=data_dir, resume=resume, overwrite=overwrite, device=device,
                   progress=progress, stop_at_step=stop_at_step, corpus=corpus).run()

"""The Trainer: one run from set-up (or resume) through its steps, validations and checkpoints
to a TrainResult. The pieces it composes live in the sibling modules."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from layerskip.device import keep_freed_memory, resolve_device
from layerskip.errors import ConfigError
from layerskip.losses import lr_at
from layerskip.training.build import build_model, compile_blocks, training_module
from layerskip.training.config import TrainConfig, TrainingDiverged, TrainResult
from layerskip.training.data_order import BatchOrder
from layerskip.training.distributed import all_agree, barrier, from_rank0, init_distributed, mean_across
from layerskip.training.init_from import check_matches, check_tokenizer, load_start, start_record
from layerskip.training.optim import make_optimizer
from layerskip.training.pacing import Pace, planned_steps, schedule_end_reason, steps_within_budget
from layerskip.training.run_dir import METRICS_FILE, MetricsLog, load_resume_point, prepare_run_dir, truncate_metrics
from layerskip.training.step import StepStats, autocast_context, early_positions, layer_keep, step_plan, step_seed


def _on(device: torch.device, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


class Trainer:
    """One training run; `run()` trains until a stop condition and returns a TrainResult."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, *, data_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, device: str = "auto", progress: bool = True,
                 stop_at_step: int | None = None, corpus: Any = None, init_checkpoint: Any = None) -> None:
        self.cfg, self.out_dir, self.progress, self.stop_at_step = cfg, out_dir, progress, stop_at_step
        self._start_process(device)
        if self.dist.main:
            prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
        barrier(self.dist)
        self.resuming = resume
        self.resume_point = load_resume_point(out_dir, cfg) if resume else None
        self.state = self.resume_point.state if self.resume_point else None
        self._find_source(init_checkpoint)
        self.corpus = corpus or self._load_corpus(data_dir)
        if self.source is not None:
            check_tokenizer(self.corpus, self.source.tokenizer, str(self.source.path))
        self._build_model()
        self.order = BatchOrder(len(self.corpus.tokens["train"]), cfg.seq_len, cfg.batch_size, cfg.seed,
                                self.dist.rank, self.dist.world)
        self._restore_progress()

    # -- set-up -------------------------------------------------------------------------

    def _start_process(self, device: str) -> None:
        self.device = resolve_device(device)
        keep_freed_memory()  # CPU steps stop page-faulting in every step's large blocks again
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.cfg.batch_size % self.dist.world:
            raise ConfigError(f"batch_size {self.cfg.batch_size} must be divisible by the {self.dist.world} processes")

    def _find_source(self, init_checkpoint: Any) -> None:
        """The checkpoint the weights, shape and tokenizer come from: last/ when resuming, the
        starting checkpoint of a new continual run (cfg.init_from), else none (seeded weights)."""
        self.source, self.init_record = None, None
        if self.state:
            self.source = self.resume_point.checkpoint
            self.init_record = self.source.meta.get("init_from")
        elif self.cfg.init_from is not None:
            self.source = load_start(init_checkpoint if init_checkpoint is not None else self.cfg.init_from)
            check_matches(self.cfg, self.source)
            self.init_record = start_record(self.source)
        self.tokenizer_config = self.source.tokenizer_config if self.source else self.cfg.tokenizer_config()

    def _load_corpus(self, data_dir: str | Path | None):
        from layerskip.data import load_corpus

        tokenizer = self.source.tokenizer if self.source else None  # the model's own, never a new one
        if not self.dist.main:
            barrier(self.dist)  # rank 0 trains and caches the tokenizer first
        corpus = load_corpus(data_dir, self.cfg.tokenizer_config(), tokenizer=tokenizer)
        if self.dist.main:
            barrier(self.dist)
        return corpus

    def _build_model(self) -> None:
        cfg = self.cfg
        self.model = build_model(cfg, self.corpus, self.device, source=self.source)
        self.source = None  # its weights are copied: let them be freed
        self.optimizer = make_optimizer(self.model, cfg)  # fresh, unless resuming
        if self.state:
            self.optimizer.load_state_dict(self.state["optimizer"])
        if cfg.compile:
            compile_blocks(self.model)
        self.module = training_module(self.model, cfg, self.dist, self.device)

    def _restore_progress(self) -> None:
        """Where the run stands: step 0, or where last/ left it."""
        state = self.state
        self.step = state["step"] if state else 0
        self.best_val = state["best_val"] if state else math.inf
        self.prior_elapsed = state["elapsed"] if state else 0.0
        saved_cfg = self.resume_point.saved_cfg if self.resume_point else None
        self.total_steps, self.total_fixed = planned_steps(self.cfg, self.order.steps_per_epoch, saved_cfg, state)
        self.val_seconds: float | None = None  # of the last validation
        self.val_estimate = 0.0

    # -- one step -----------------------------------------------------------------------

    def train_step(self, step: int) -> StepStats:
        cfg, dev, start = self.cfg, self.device, time.perf_counter()
        exits, weights, probs = step_plan(cfg, step, self.total_steps)
        torch.manual_seed(step_seed(cfg.seed, step, self.dist.rank))  # nn.Dropout's stream
        rows = self.dist.own_rows(cfg.batch_size)
        keep = layer_keep(cfg, step, probs, rows)
        x, y = self.order.batch(self.corpus.tokens["train"], step)
        positions = early_positions(cfg, step, rows)
        lr = self._set_lr(step)
        with autocast_context(cfg, dev):
            loss, per_exit, kl = self.module(x.to(dev), y.to(dev), exits, weights, _on(dev, keep), _on(dev, positions))
        shared = mean_across(torch.cat([loss.detach().float().reshape(1), per_exit.float(), kl.float()]).cpu(),
                             self.dist).tolist()
        self._stop_if_diverged(step, "the loss", shared[0])
        grad_norm = self._update(step, loss)
        return StepStats(shared[0], exits, shared[1 : 1 + len(exits)], lr, grad_norm, time.perf_counter() - start,
                         exit_kl=shared[1 + len(exits) :])

    def _set_lr(self, step: int) -> float:
        cfg = self.cfg
        lr = lr_at(step, base_lr=cfg.lr, warmup=cfg.warmup, total_steps=self.total_steps, min_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _update(self, step: int, loss: torch.Tensor) -> float | None:
        """Backward, clip, optimizer step; the gradient norm before clipping (None: no clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
            self._stop_if_diverged(step, "the gradient norm", grad_norm)
        self.optimizer.step()
        return grad_norm

    def _stop_if_diverged(self, step: int, what: str, value: float) -> None:
        if math.isfinite(value):
            return
        last = self.out_dir / "last"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
        raise TrainingDiverged(f"training stopped at step {step + 1}: {what} became {value}; {kept}. Lower --lr "
                               f"(now {self.cfg.lr}) or --max_skip_prob, or use --precision fp32, and start again")

    # -- validation and checkpoints ------------------------------------------------------

    def validate(self) -> Any:
        from layerskip.evaluation import evaluate_model

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
        if self.init_record is not None:
            meta["init_from"] = self.init_record
        return save_checkpoint(self.out_dir / which, self.model, self.corpus.tokenizer,
                               tokenizer_config=self.tokenizer_config, train_config=cfg.to_dict(), meta=meta,
                               trainer_state=self._trainer_state() if which == "last" else None)

    def _trainer_state(self) -> dict[str, Any]:
        """What resuming needs besides the weights (last/trainer_state.pt)."""
        cfg, step, spe = self.cfg, self.step, self.order.steps_per_epoch
        return {
            "version": 1,
            "step": step,
            "total_steps": self.total_steps,
            "total_fixed": self.total_fixed,
            "optimizer": self.optimizer.state_dict(),
            "best_val": self.best_val,
            "elapsed": self.elapsed(),
            "data_position": {"epoch": step // spe, "batch_in_epoch": step % spe},
            # the curriculum, layer-dropout schedule and every random draw are functions of
            # (seed, step, total_steps); these record what the next step will use
            "curriculum": {"name": cfg.early_exit_curriculum, "next_exits": step_plan(cfg, step, self.total_steps)[0]},
            "rng": {"scheme": "per-step seeds", "seed": cfg.seed, "torch": torch.get_rng_state()},
        }

    def _validate_and_save(self, metrics: MetricsLog) -> Any:
        if not self.dist.main:
            barrier(self.dist)
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
        barrier(self.dist)
        return val

    def elapsed(self) -> float:
        return self.prior_elapsed + time.perf_counter() - self.start_time

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        metrics = self._open_metrics()
        self.start_time = time.perf_counter()
        bar = self._progress_bar()
        if self.dist.main:
            metrics.write({"type": "start", "step": self.step, "resumed": self.resuming, "config": self.cfg.to_dict(),
                           "world_size": self.dist.world, "device": str(self.device),
                           "steps_per_epoch": self.order.steps_per_epoch, "torch": torch.__version__,
                           **({"init_from": self.init_record} if self.init_record else {})})
        losses: list[float] = []
        self.last_val, self.last_val_step = None, -1  # the latest validation's result and step
        try:
            stopped = self._run_steps(metrics, bar, losses)
            self._save_at_stop(stopped, metrics)
        finally:
            bar.close()
        if self.dist.main:
            metrics.write({"type": "end", "step": self.step, "stopped": stopped, "elapsed": self.elapsed(),
                           "best_val_loss": self.best_val})
        metrics.close()
        barrier(self.dist)
        return TrainResult(run_dir=self.out_dir, best=self.out_dir / "best", last=self.out_dir / "last",
                           step=self.step, stopped=stopped, losses=losses, val=self.last_val)

    def _open_metrics(self) -> MetricsLog:
        path = self.out_dir / METRICS_FILE
        if self.resuming and self.dist.main:
            truncate_metrics(path, self.step)
        return MetricsLog(path, self.dist.main)

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.total_steps if self.total_fixed else None, initial=self.step, file=sys.stderr,
                    disable=not (self.progress and self.dist.main), unit="step", dynamic_ncols=True)

    def _run_steps(self, metrics: MetricsLog, bar: Any, losses: list[float]) -> str:
        """Step until a stop condition; returns its name."""
        pace = Pace(self.step)
        while True:
            stopped = self._stop_reason()
            if stopped:
                return stopped
            pace.before_step(self.step)
            stats = self.train_step(self.step)
            self.step += 1
            losses.append(stats.loss)
            self._repace(pace, bar)
            self._log_step(stats, metrics, bar)
            if self._validation_due():
                self.last_val, self.last_val_step = self._validate_and_save(metrics), self.step
                pace.restart(self.step)  # validations are not steps
            elif self.step % self.cfg.save_every == 0 and self.dist.main:
                self.save("last")

    def _validation_due(self) -> bool:
        """At the end of every epoch, and every val_every steps when set."""
        val_every = self.cfg.val_every
        return self.step % self.order.steps_per_epoch == 0 or bool(val_every and self.step % val_every == 0)

    def _save_at_stop(self, stopped: str, metrics: MetricsLog) -> None:
        """Validate and save a finished run; only save one stopped as if interrupted."""
        if stopped != "stop_at_step" and self.last_val_step != self.step and self.step > 0:
            self.last_val = self._validate_and_save(metrics)
        elif self.dist.main and self.last_val_step != self.step:
            self.save("last")

    def _log_step(self, stats: StepStats, metrics: MetricsLog, bar: Any) -> None:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tokens_per_step / stats.seconds:,.0f}")
        if self.dist.main and (self.step % cfg.log_every == 0 or self.step == 1):
            metrics.write({"type": "train", "step": self.step, "epoch": self.step / self.order.steps_per_epoch,
                           "loss": stats.loss, "exits": stats.exits, "exit_losses": stats.exit_losses, "lr": stats.lr,
                           "grad_norm": stats.grad_norm, "step_seconds": stats.seconds,
                           "tokens_per_s": tokens_per_step / stats.seconds, "elapsed": self.elapsed(),
                           **({"exit_kl": stats.exit_kl} if cfg.early_exit_distill else {})})

    # -- when to stop ---------------------------------------------------------------------

    def _stop_reason(self) -> str:
        cfg = self.cfg
        if self.stop_at_step is not None and self.step >= self.stop_at_step:
            return "stop_at_step"
        if self.step >= self.total_steps:
            return schedule_end_reason(cfg, self.step, self.order.steps_per_epoch)
        if cfg.time_budget is not None:
            reserve = self.val_seconds if self.val_seconds is not None else self.val_estimate
            if all_agree(self.elapsed() + reserve >= cfg.time_budget * 60, self.dist):
                return "time_budget"
        return ""

    def _repace(self, pace: Pace, bar: Any) -> None:
        """Under a time budget, refit the schedule to the time left whenever the pace is re-measured."""
        step_seconds = pace.after_step(self.step, fixed=self.total_fixed)
        if step_seconds is None or self.cfg.time_budget is None:
            return
        total, self.val_estimate = steps_within_budget(
            self.cfg, step=self.step, remaining=self.cfg.time_budget * 60 - self.elapsed(), step_seconds=step_seconds,
            val_seconds=self.val_seconds, valid_tokens=len(self.corpus.tokens["valid"]),
            steps_per_epoch=self.order.steps_per_epoch)
        self.total_steps = from_rank0(total, self.dist)  # every rank must run the same schedule
        self.total_fixed = True
        bar.total = self.total_steps


def train(cfg: TrainConfig, out_dir: str | Path, *, data_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto", progress: bool = True, stop_at_step: int | None = None,
          corpus: Any = None, init_checkpoint: Any = None) -> TrainResult:
    """Train into out_dir (RUN/best, RUN/last, RUN/metrics.jsonl); see TrainConfig for the settings.

    resume: continue the run in out_dir (cfg must equal its saved config, see resume_config).
    stop_at_step: stop after this many steps as if interrupted (last/ is saved, no validation).
    corpus: an already loaded ``layerskip.data.Corpus`` (skips locating and encoding the data).
    init_checkpoint: the loaded checkpoint cfg.init_from names (see init_config), so it is not read twice.
    """
    return Trainer(cfg, Path(out_dir), data_dir=data_dir, resume=resume, overwrite=overwrite, device=device,
                   progress=progress, stop_at_step=stop_at_step, corpus=corpus, init_checkpoint=init_checkpoint).run()

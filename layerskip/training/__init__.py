"""Training: WikiText-2 -> a run directory with best/ and last/ checkpoints (``train``).

One step samples the per-sample layer-dropout mask, runs the trunk once collecting the hidden
states of the exits the curriculum enables, and takes the weighted early-exit loss of those
exits through the shared head (``layerskip.losses``). Muon for the blocks' matrices and AdamW
for the rest (or AdamW alone), linear warm-up + cosine decay, gradient clipping; optional bf16
autocast and ``torch.compile`` of each block separately.

Everything random is derived from the seed, so a run is reproducible, and the trainer state
saved with each checkpoint (optimizer, RNG, step, data position, estimated total steps)
makes ``resume`` continue with exactly the losses an uninterrupted run would have had.

    config.py       TrainConfig, what a resume may change, TrainResult
    step.py         one step's plan, random draws and loss (ExitLossModel)
    optim.py        AdamW, or Muon + AdamW
    build.py        the model a run trains: seeded, resumed or started from a checkpoint, compiled per block, DDP
    init_from.py    continual training: the config and records of a run starting from a checkpoint
    data_order.py   which windows of the train split each step reads
    distributed.py  torchrun processes and their collectives
    run_dir.py      --out, resuming from it, metrics.jsonl
    pacing.py       how many steps the schedule spans (re-fitted under a time budget)
    loop.py         the Trainer composing them, and ``train``
"""

from layerskip.training.config import RESUME_OVERRIDABLE, TrainConfig, TrainingDiverged, TrainResult, saved_train_config
from layerskip.training.distributed import DistInfo, init_distributed
from layerskip.training.init_from import init_config, load_start, same_start
from layerskip.training.loop import Trainer, train
from layerskip.training.optim import OptimizerGroup, make_optimizer
from layerskip.training.run_dir import resume_config
from layerskip.training.step import ExitLossModel, flat_positions, sample_early_positions, step_plan

__all__ = [
    "RESUME_OVERRIDABLE",
    "DistInfo",
    "ExitLossModel",
    "OptimizerGroup",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "flat_positions",
    "init_config",
    "init_distributed",
    "load_start",
    "make_optimizer",
    "resume_config",
    "sample_early_positions",
    "same_start",
    "saved_train_config",
    "step_plan",
    "train",
]

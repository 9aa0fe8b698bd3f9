"""Train a model on WikiText-2, with LayerSkip (the default) or plain (the baseline).

LayerSkip (per-sample layer dropout growing with depth + early-exit loss with a curriculum):
  layerskip train --out runs/layerskip --time_budget 18 --eval

Plain training, the baseline:
  layerskip train --out runs/plain --max_skip_prob 0 --early_exit_scale 0 --time_budget 18 --eval

The seed study's spellings work too (--d_model or --d-model, ...), and so does its
"--train --eval" form: train, then evaluate every layer of the best checkpoint on the test
split. --eval alone evaluates the run already in --out (or --checkpoint CKPT). The run directory gets best/ and
last/ checkpoints and metrics.jsonl; --resume continues a stopped run exactly where it was,
--overwrite replaces one. Under torchrun every process trains its share of each batch
(DistributedDataParallel) and only rank 0 prints and writes.

Continual LayerSkip training of an existing model (its weights, tokenizer and shape; a fresh
optimizer; the schedule and LayerSkip settings from the flags), with the paper's values
(rotational, the default curriculum; its e_scale is 0.1 to 0.2; its depth-weighted exit loss
without distillation, where this project's defaults weight the exits alike and distill them):
  layerskip train --out runs/cont --init-from runs/plain --max_skip_prob 0.1 --layer_dropout_schedule exp \\
  --early_exit_scale 0.1 --early_exit_weighting depth --early_exit_distill 0
"""

from __future__ import annotations

import argparse

from layerskip.cli.common import add_checkpoint_arg, add_data_dir_arg, add_device_arg, add_flag

# (flag, type, help); every flag's default is None: "not given", so the config's default
# (or, with --resume, the saved run's value) applies.
TRAIN_FLAGS: list[tuple[str, type, str]] = [
    ("d_model", int, "model width (default 128)"),
    ("num_layers", int, "number of blocks (default 6)"),
    ("num_heads", int, "attention heads (default 8)"),
    ("d_ff", int, "SwiGLU hidden size (default 512)"),
    ("dropout", float, "dropout (default 0; the seed study used 0.1, which costs attention its fused kernel)"),
    ("vocab_size", int, "tokenizer vocabulary; the model's vocabulary is the tokenizer's (default 8192)"),
    ("seq_len", int, "training context in tokens (default 256)"),
    ("batch_size", int, "sequences per step, across all processes (default 16)"),
    ("lr", float, "peak learning rate (default 8e-3)"),
    ("warmup", int, "linear warm-up steps before cosine decay (default 100)"),
    ("min_lr_ratio", float, "the cosine decay ends at this fraction of the peak LR (default 0.1)"),
    ("beta2", float, "AdamW's second-moment decay (default 0.95)"),
    ("weight_decay", float, "weight decay of matrices, Muon's and AdamW's (default 0.1)"),
    ("grad_clip", float, "gradient-norm clipping, 0 for none (default 1.0)"),
    ("epochs", int, "stop after this many epochs"),
    ("max_steps", int, "stop after this many steps"),
    ("time_budget", float, "stop after this many minutes (validation included); the LR schedule fits it"),
    ("seed", int, "random seed (default 0)"),
    ("max_skip_prob", float, "layer dropout of the last block; 0 turns layer dropout off (default 0.1)"),
    ("early_exit_scale", float, "early-exit loss scale; 0 trains the last layer only (default 1.0)"),
    ("early_exit_scale_end", float, "the early-exit loss scale at the schedule's end, reached linearly from "
     "--early_exit_scale (default: constant)"),
    ("early_exit_rotation", int, "rotational curriculum: every R-th exit each step (default 2)"),
    ("early_exit_gradual_steps", int, "gradual curriculum: steps to enable every exit (default: the run)"),
    ("early_exit_tokens", float, "fraction of tokens the early exits' loss is estimated on (default 0.25; 1: all)"),
    ("early_exit_distill", float, "self-distillation weight W in [0, 1]: each early exit's loss is (1 - W) x "
     "cross-entropy + W x T^2 x KL(last layer, detached || exit) on the same tokens (default 0.9; 0: cross-entropy only)"),
    ("early_exit_distill_temperature", float, "the distillation temperature T (default 1)"),
    ("early_exit_focus", float, "weight each early-exit token's loss by the last layer's top-1 probability to "
     "this power, normalised to mean 1, so the exits train where they could exit (default 0: every token alike)"),
    ("val_every", int, "also validate every N steps (default: each epoch only)"),
    ("val_tokens", int, "validate on the first N valid tokens only (default 65536; 0: all)"),
    ("eval_batch_size", int, "sequences per evaluation batch (default 16)"),
    ("save_every", int, "steps between last/ checkpoints (default 50)"),
    ("log_every", int, "steps between metrics.jsonl records (default 1)"),
    ("loss_chunk", int, "tokens per chunk of the head + loss (default 4096)"),
]
CHOICE_FLAGS: list[tuple[str, list[str], str]] = [
    ("early_exit_curriculum", ["none", "rotational", "gradual"], "which exits get a loss each step (default rotational)"),
    ("early_exit_weighting", ["uniform", "depth"], "how the exits' losses are weighted: uniform, e_scale for every early exit and 1 "
     "for the last (default); depth, e_scale x k(k+1)/2 for exit k as in the paper"),
    ("layer_dropout_schedule", ["linear", "exp"], "how skip probability grows with depth (default linear)"),
    ("layer_dropout_ramp", ["constant", "exp"], "how it grows over training time (default constant)"),
    ("precision", ["fp32", "bf16"], "bf16 autocast or full fp32 (default bf16)"),
    ("optimizer", ["adamw", "muon"], "muon: Muon for the blocks' matrices, AdamW for the rest (the default); adamw: AdamW for all"),
    ("tokenizer_type", ["bpe", "unigram"], "SentencePiece model type (default bpe)"),
]

# Settings with a parser of their own (a switch, a list), added in add_arguments.
OTHER_FLAGS = ["compile", "early_exit_layers", "early_exit_trains_head"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/train", help="run directory (default runs/train)")
    add_data_dir_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--train", action="store_true", help="train (the default unless only --eval is given)")
    parser.add_argument("--eval", action="store_true", help="then evaluate every layer of the best checkpoint")
    add_checkpoint_arg(parser, required=False)
    parser.add_argument("--eval_split", "--eval-split", dest="eval_split", default="test", choices=["valid", "test"])
    add_flag(parser, "init_from", default=None, metavar="CKPT",
             help="continual training: start from this checkpoint or run directory (its weights, tokenizer and "
                  "shape; a fresh optimizer; schedule and LayerSkip settings from the flags)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("model and training settings")
    for name, kind, help_text in TRAIN_FLAGS:
        add_flag(group, name, type=kind, default=None, help=help_text)
    for name, choices, help_text in CHOICE_FLAGS:
        add_flag(group, name, choices=choices, default=None, help=help_text)
    add_flag(group, "compile", action=argparse.BooleanOptionalAction, default=None,
             help="torch.compile each block separately (default on)")
    add_flag(group, "early_exit_layers", type=int, nargs="+", default=None, metavar="K",
             help="the early exits that get a loss (default: every block's), e.g. 1 2 3; the last block's always does")
    add_flag(group, "early_exit_trains_head", action=argparse.BooleanOptionalAction, default=None,
             help="whether the early exits' loss trains the shared final norm and LM head; "
                  "--no-early_exit_trains_head leaves them to the last layer's loss (default on)")


def explicit_settings(args: argparse.Namespace) -> dict:
    names = [n for n, _, _ in TRAIN_FLAGS] + [n for n, _, _ in CHOICE_FLAGS] + OTHER_FLAGS
    settings = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if settings.get("val_tokens") == 0:
        settings["val_tokens"] = None  # the whole valid split
    return settings


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerskip.api import train

    out = Path(args.out)
    do_train = args.train or not args.eval
    if do_train:
        result = train(out, data_dir=args.data_dir, resume=args.resume, overwrite=args.overwrite, device=args.device,
                       progress=not args.quiet, init_from=args.init_from, **explicit_settings(args))
        if result.val is not None:
            print(result.val.table())
        print(f"trained {result.step} steps (stopped: {result.stopped}); best checkpoint {result.best}")
    if args.eval:
        return evaluate_run(out, args)
    return 0


def evaluate_run(out, args: argparse.Namespace) -> int:
    from layerskip.api import evaluate
    from layerskip.cli.evaluate import write_json
    from layerskip.device import resolve_device
    from layerskip.training import init_distributed

    if not init_distributed(resolve_device(args.device)).main:
        return 0  # under torchrun, rank 0 evaluates

    target = args.checkpoint if args.checkpoint and not args.train else out  # seed form: --eval --checkpoint
    result = evaluate(target, split=args.eval_split, data_dir=args.data_dir, device=args.device)
    print(result.table())
    if target == out:
        write_json(result, out / f"eval_{args.eval_split}.json")
    return 0

"""Argument helpers shared by the subcommands (argparse only: no torch import here)."""

from __future__ import annotations

import argparse
from typing import Any


def add_flag(parser: argparse._ActionsContainer, name: str, **kwargs: Any) -> argparse.Action:
    """Add --name accepting both the seed study's underscores and dashes (--max_skip_prob, --max-skip-prob)."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    kwargs.setdefault("dest", name)
    return parser.add_argument(*spellings, **kwargs)


def add_checkpoint_arg(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--checkpoint",
        required=required,
        help="a checkpoint directory, a run directory (meaning its best checkpoint), a Hugging Face Llama "
        "directory (config.json, safetensors, tokenizer.model or tokenizer.json; read in place), or hf:OWNER/NAME "
        "(downloaded from the Hugging Face hub; needs the hub extra)",
    )


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    from layerskip.dtypes import CPU_BF16_KERNELS_MIN_PARAMETERS, CPU_BF16_MIN_PARAMETERS

    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=f"the weights' dtype (auto: on the CPU float32 below {CPU_BF16_KERNELS_MIN_PARAMETERS // 10**6}M "
        f"parameters where layerskip's bf16 kernels run (AVX512-BF16), else below "
        f"{CPU_BF16_MIN_PARAMETERS // 10**6}M, and bfloat16 from there; bfloat16 on CUDA)",
    )


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "data_dir",
        default=None,
        help="directory with wiki.{train,valid,test}.tokens (default: $LAYERSKIP_DATA_DIR, "
        "then the per-user cache, then a download from the Hugging Face hub)",
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run (auto: CUDA when present, else CPU)",
    )

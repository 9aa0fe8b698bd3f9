"""Processes under torchrun: who this one is, and the few collectives the trainer needs.

With one process every helper returns its input (or does nothing), without touching
``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def own_rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch."""
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


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


def all_agree(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any (so all ranks stop together)."""
    if info.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world == 1:
        return value
    import torch.distributed as dist

    value = value.detach().clone().cpu()
    dist.all_reduce(value)
    return value / info.world


def from_rank0(value: int, info: DistInfo) -> int:
    if info.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()

"""torch.distributed in one place: rank, world size, barrier and sums that are no-ops alone.

Under `torchrun` (gloo on CPU, NCCL on GPUs) each rank takes every world-th shard of the training
set and writes its own shard files; the files are named by shard, so the merged result is
identical to a single process's.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes (if any); True when running distributed. The
    group is left at exit (a live gloo group torn down by the interpreter can abort the rank:
    "terminate called without an active exception")."""
    if dist.is_available() and not dist.is_initialized() and "RANK" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_leave)
    return is_distributed()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (and return it)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

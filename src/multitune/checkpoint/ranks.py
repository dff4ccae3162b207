"""The few collectives the checkpointer needs, each a no-op without a process group.

Every rank must reach these calls in the same order. Decisions that one rank makes (the temporary
folder name, the commit outcome, the resume choice) are broadcast from rank 0, and local failures
are gathered, so that all ranks raise together instead of some waiting forever in a barrier.
With NCCL, ``torch.cuda.set_device`` must have been called first (object collectives stage on the
current device).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_problems(problems: list[str]) -> list[str]:
    """Every rank's problems on every rank, prefixed with the rank that found them.

    Doubles as a barrier: no rank returns before all ranks have called it.
    """
    if not is_distributed():
        return list(problems)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(problems))
    return [f"rank {rank}: {problem}" for rank, found in enumerate(gathered) for problem in found]

"""Who this process is in a torchrun job, the process group, and the few collectives the loop
needs. In a plain single process every function here is a no-op with the obvious answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from multitune.config.schema import DistributedConfig
from multitune.models.loading import pick_device

log = logging.getLogger(__name__)

# torchrun sets all of these for each worker. Runpod also sets WORLD_SIZE on every pod, to the
# cluster's GPU count, so WORLD_SIZE alone never means "launched by torchrun".
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; rank 0 alone writes outputs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def one_process_or(ctx: DistContext | None, device=None) -> DistContext:
    """``ctx``, or the one-process context when there is no process group.

    Without a context a function would divide by world size 1 while the strategy sums the
    gradients of every rank, a silently wrong run; so a missing context is an error once a
    process group exists (pass the one ``init_distributed`` returned).
    """
    if ctx is not None:
        return ctx
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            f"a process group of {dist.get_world_size()} processes is initialised but no "
            "DistContext was given; pass the one init_distributed returned"
        )
    return DistContext(device=torch.device("cpu") if device is None else device)


def launched_by_torchrun(env=os.environ) -> bool:
    return all(name in env for name in TORCHRUN_VARS)


def init_distributed(cfg: DistributedConfig) -> DistContext:
    """Start the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    Every collective gets ``cfg.timeout_minutes``, so a lost peer turns into an error on the
    others (and a restart under ``torchrun --max-restarts``) instead of a hang.
    """
    if not launched_by_torchrun():
        world = os.environ.get("WORLD_SIZE")
        if world not in (None, "1"):
            log.warning(
                "WORLD_SIZE=%s is set but this process was not started by torchrun (runpod sets "
                "it to the cluster's GPU count); training as one process. Use `multitune "
                "launch` to train on several",
                world,
            )
        return DistContext(device=pick_device())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=timedelta(minutes=cfg.timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    if rank != 0 and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # One copy of the run's log is enough; other ranks still report warnings and errors.
        logging.getLogger("multitune").setLevel(logging.WARNING)
    log.info(
        "process group: %d processes (%d nodes x %d), backend %s, timeout %g min",
        world,
        max(1, world // local_world),
        local_world,
        backend,
        cfg.timeout_minutes,
    )
    return DistContext(rank, world, local_rank, local_world, device, initialized=True)


def destroy_distributed(ctx: DistContext) -> None:
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_rank_zero_first(ctx: DistContext):
    """Local rank 0 of each node runs the block first (hub downloads into the node's cache);
    the other ranks run it once every node's rank 0 is done, and find the files cached."""
    if ctx.initialized and ctx.local_rank != 0:
        dist.barrier()
    yield
    if ctx.initialized and ctx.local_rank == 0:
        dist.barrier()


def any_rank(ctx: DistContext, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any rank: decisions every rank must take together
    (stop on a signal one rank got first, a checkpoint due by one rank's clock)."""
    if not ctx.initialized:
        return tuple(bool(f) for f in flags)
    values = torch.tensor([int(bool(f)) for f in flags], device=ctx.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def sum_over_ranks(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor; the input is kept)."""
    total = tensor.detach().clone()
    if ctx.initialized:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_ranks_done(done: bool, device) -> bool:
    """True once ``done`` is true on every rank of the process group (``done`` itself without
    one): a decode loop over sharded layers stops when the last rank is done, since every rank
    must run the same forwards (``device``: where the flag's collective runs)."""
    if not (dist.is_available() and dist.is_initialized()):
        return done
    flag = torch.tensor([int(done)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def most_over_ranks(count: int, device) -> int:
    """The largest ``count`` over the ranks of the process group (``count`` without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    value = torch.tensor([count], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())

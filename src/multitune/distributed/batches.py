"""Data parallelism for the training loop: each rank's share of a global batch, the global
answer-token count the loss is divided by, and the step's figures summed over ranks.

The global batch is a slice of the epoch's one seeded order, the same at any world size; rank r
trains on the r-th contiguous share of it. Every rank divides its summed token losses by the
answer tokens of the WHOLE global batch, and the strategy sums gradients over ranks, so N
processes produce the gradient one process computes for the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import torch

from multitune.data.formatting import IGNORE_INDEX
from multitune.distributed.process_group import DistContext, sum_over_ranks
from multitune.training.step import StepResult, micro_batch_targets

T = TypeVar("T")


def rank_share(chosen: Sequence[T], rank: int, world_size: int) -> Sequence[T]:
    """Rank ``rank``'s contiguous share of one global batch; the shares partition ``chosen``.

    A short last batch of an epoch leaves the last ranks fewer examples, or none.
    """
    share = math.ceil(len(chosen) / world_size)
    return chosen[rank * share : (rank + 1) * share]


def rank_micro_batches(
    chosen: Sequence[T],
    ctx: DistContext,
    micro_batch_size: int,
    collate: Callable[[Sequence[T]], dict[str, torch.Tensor]],
    filler: Callable[[Sequence[T]], object] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the global batch ``chosen``, as many on every rank.

    Sharded layers all-gather in every forward, so all ranks must run the same number of them.
    A rank whose share of a short last batch runs out pads with copies of the batch's first
    example whose labels are all ignored: they add no loss, no answer tokens and a zero gradient.
    ``filler(items)`` makes such a micro-batch for a stage whose batches are not labelled token
    tensors (DPO's pairs); by default it is ``collate`` with every label ignored.
    """
    share = math.ceil(len(chosen) / ctx.world_size)
    count = math.ceil(share / micro_batch_size)
    mine = rank_share(chosen, ctx.rank, ctx.world_size)
    batches = [
        collate(mine[i : i + micro_batch_size]) for i in range(0, len(mine), micro_batch_size)
    ]
    while len(batches) < count:
        batches.append(filler(chosen[:1]) if filler else _ignored(collate(chosen[:1])))
    return batches


def _ignored(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch


def global_answer_tokens(ctx: DistContext, micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Answer tokens of the whole global batch (all ranks): the loss normaliser."""
    local = sum(int((micro_batch_targets(mb) != IGNORE_INDEX).sum()) for mb in micro_batches)
    return int(sum_over_ranks(ctx, torch.tensor(local, device=ctx.device)).item())


def sum_step_results(ctx: DistContext, result: StepResult) -> StepResult:
    """The step's loss and per-task figures over the whole global batch (one all-reduce).

    Each rank's ``loss`` is its share of the summed token losses over the global token count,
    so the sum over ranks is the global batch's mean token loss.
    """
    if not ctx.initialized:
        return result
    num_tasks = result.task_loss_sums.numel()
    packed = torch.cat(
        [
            result.loss.detach().reshape(1).float(),
            result.task_loss_sums.float(),
            result.task_token_counts.float(),
            torch.tensor([float(result.num_input_tokens)], device=result.loss.device),
        ]
    )
    total = sum_over_ranks(ctx, packed)
    return replace(
        result,
        loss=total[0],
        task_loss_sums=total[1 : 1 + num_tasks],
        task_token_counts=total[1 + num_tasks : 1 + 2 * num_tasks],
        num_input_tokens=int(total[-1].item()),
    )

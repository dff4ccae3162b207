"""Seeding and the batch arithmetic of a run."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from multitune.config.schema import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int  # micro-batches per optimizer step on each process
    global_batch: int
    examples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    world_size: int = 1

    def describe(self) -> str:
        processes = f" x {self.world_size} processes" if self.world_size > 1 else ""
        return (
            f"{self.examples_per_epoch} examples/epoch, global batch {self.global_batch} "
            f"(micro {self.micro_batch_size} x accum {self.grad_accum}{processes}), "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
        )


def plan_batches(cfg: TrainConfig, examples_per_epoch: int, world_size: int = 1) -> BatchPlan:
    """The global batch is fixed by the config (``global_batch_size``, else micro x grad_accum),
    so a run takes the same steps at any world size; the accumulation per process adapts."""
    global_batch = cfg.global_batch_size or cfg.micro_batch_size * cfg.grad_accum
    per_step = cfg.micro_batch_size * world_size
    if global_batch % per_step:
        source = (
            f"train.global_batch_size ({global_batch})"
            if cfg.global_batch_size
            else f"the global batch train.micro_batch_size x train.grad_accum ({global_batch})"
        )
        raise ValueError(
            f"{source} must be a multiple of train.micro_batch_size ({cfg.micro_batch_size}) x "
            f"{world_size} processes = {per_step}, so every process runs whole micro-batches; "
            "change train.global_batch_size or train.micro_batch_size"
        )
    steps_per_epoch = math.ceil(examples_per_epoch / global_batch)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return BatchPlan(
        cfg.micro_batch_size,
        global_batch // per_step,
        global_batch,
        examples_per_epoch,
        steps_per_epoch,
        total,
        world_size,
    )

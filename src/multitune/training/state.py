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
    grad_accum: int
    global_batch: int
    examples_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    def describe(self) -> str:
        return (
            f"{self.examples_per_epoch} examples/epoch, global batch {self.global_batch} "
            f"(micro {self.micro_batch_size} x accum {self.grad_accum}), "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
        )


def plan_batches(cfg: TrainConfig, examples_per_epoch: int) -> BatchPlan:
    global_batch = cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(examples_per_epoch / global_batch)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return BatchPlan(
        cfg.micro_batch_size,
        cfg.grad_accum,
        global_batch,
        examples_per_epoch,
        steps_per_epoch,
        total,
    )

"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from multitune.config.schema import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: LoRA matched nothing or everything is frozen")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``ceil(warmup_ratio x total_steps)`` steps, then cosine or linear
    decay to 0, or constant: transformers' schedules, so a run's learning rates are those of the
    HF Trainer and TRL for the same settings (step s of the warmup runs at lr x s / warmup, the
    first at 0).

    Resuming needs nothing of our own: the schedules are ``LambdaLR``s of (step, total), the
    checkpoint restores the step, and a resumed run rebuilt with a longer ``max_steps`` follows
    the new length from that step on.
    """
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

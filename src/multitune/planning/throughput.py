"""Training FLOPs per token, and time and cost from a token count and an assumed MFU.

Per token, with N the frozen parameters used as matmuls (decoder linears + head), T the
trainable ones (LoRA A/B, a trained head copy), L layers, s the sequence length, q = heads *
head_dim:

- frozen base: forward 2N + backward for activation gradients only 2N = 4N (no weight grads);
- trainable: 6T (forward 2T, backward 4T: activation and weight gradients);
- attention scores and values: forward 2*L*s*q (QK^T and PV, halved by the causal mask),
  backward twice that: 6*L*s*q;
- activation checkpointing runs the forward twice: + 2N + 2T + 2*L*s*q.

The head is counted for every token (the SFT loss projects only answer positions, so this is
an upper bound), padding is not.
"""

from __future__ import annotations

import math

DEFAULT_MFU = 0.35


def flops_per_token(
    frozen_matmul: int,
    trainable_matmul: int,
    layers: int,
    seq_len: int,
    q_dim: int,
    checkpointing: bool,
) -> int:
    attention_forward = 2 * layers * seq_len * q_dim
    flops = 4 * frozen_matmul + 6 * trainable_matmul + 3 * attention_forward
    if checkpointing:
        flops += 2 * frozen_matmul + 2 * trainable_matmul + attention_forward
    return flops


def training_time(
    num_tokens: int,
    epochs: int,
    flops_token: int,
    world_size: int,
    peak_tflops: float,
    mfu: float,
) -> dict[str, float]:
    """Seconds per epoch and in total: tokens x FLOPs/token / (devices x peak x MFU)."""
    per_second = world_size * peak_tflops * 1e12 * mfu
    epoch_seconds = num_tokens * flops_token / per_second
    return {
        "tokens_per_second": per_second / flops_token,
        "epoch_seconds": epoch_seconds,
        "total_seconds": epoch_seconds * epochs,
    }


def steps_per_epoch(num_examples: int, micro_batch: int, grad_accum: int, world_size: int) -> int:
    return math.ceil(num_examples / (micro_batch * grad_accum * world_size))

"""Fused linear head + per-token target log-probabilities, without [N, V] logits."""

from __future__ import annotations

import torch

from multitune.ops.extension import CPP, active_backend
from multitune.ops.linear_logprob import (
    COUNT_ON_DEVICE,
    DEFAULT_CHUNK_SIZE,
    compute_dtype,
    register_linear_logprob_kernels,
)

OP_NAME = "linear_token_logprobs"


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_labelled: int | None = None,
) -> torch.Tensor:
    """Per-token ``log_softmax(hidden @ weight.T)[target]`` for a bias-free lm_head (DPO, scoring).

    Args:
        hidden: [N, H] final hidden states (flatten batch and sequence first), any float dtype.
        weight: [V, H] lm_head weight; its gradient is computed only if it requires grad.
        targets: [N] int64 target ids; ``ignore_index`` marks positions to skip.
        ignore_index: target value whose position gets log-probability 0 and zero gradient.
        chunk_size: labelled rows projected onto the vocabulary at a time (memory ~chunk x V).
        num_labelled: how many targets are not ``ignore_index``, when the caller knows it: the
            op then never waits for the device (default: counted on the device, one sync).

    Returns:
        [N] log-probabilities in float32 (float64 if an input is float64), 0 where ignored.
        Exactly ``-linear_cross_entropy(...)``; both share one C++ kernel.

    Memory: bf16/fp16 inputs are computed in float32 with float32 logits; the weight is cast
    4096 vocabulary rows at a time, never whole (plus a float32 weight-gradient accumulator
    when it is trainable).
    """
    if active_backend() == CPP:
        return torch.ops.multitune.linear_token_logprobs(
            hidden,
            weight,
            targets,
            ignore_index,
            chunk_size,
            COUNT_ON_DEVICE if num_labelled is None else num_labelled,
        )
    return reference_linear_token_logprobs(hidden, weight, targets, ignore_index)


def reference_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The unfused computation: full [N, V] logits, ``log_softmax``, gather, mask."""
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    logprobs = torch.log_softmax(hidden.to(dtype) @ weight.to(dtype).T, dim=-1)
    keep = targets != ignore_index
    # Ignored targets (e.g. -100) are not valid indices; gather at 0 and mask the result.
    picked = logprobs.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)
    return torch.where(keep, picked, torch.zeros_like(picked))


def register_kernels() -> None:
    """Fake and autograd kernels for the C++ op; called once the extension is loaded."""
    register_linear_logprob_kernels(OP_NAME)

"""Fused linear head + per-token cross entropy, without materialising [N, V] logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitune.ops.extension import CPP, active_backend
from multitune.ops.linear_logprob import (
    COUNT_ON_DEVICE,
    DEFAULT_CHUNK_SIZE,
    compute_dtype,
    register_linear_logprob_kernels,
)

OP_NAME = "linear_cross_entropy"


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_labelled: int | None = None,
) -> torch.Tensor:
    """Per-token ``-log_softmax(hidden @ weight.T)[label]`` for a bias-free lm_head.

    Args:
        hidden: [N, H] final hidden states (flatten batch and sequence first), any float dtype.
        weight: [V, H] lm_head weight; its gradient is computed only if it requires grad.
        labels: [N] int64 target ids; ``ignore_index`` marks positions without a loss.
        ignore_index: label value whose position gets loss 0 and zero gradient.
        chunk_size: labelled rows projected onto the vocabulary at a time; the extra memory is
            about ``chunk_size * V * 4`` bytes instead of ``N * V * 4``.
        num_labelled: how many targets are not ``ignore_index``, when the caller knows it: the
            op then never waits for the device (default: counted on the device, one sync).

    Returns:
        [N] losses in float32 (float64 if an input is float64), 0 at ignored positions. Not
        reduced, so callers can normalise by the exact token count or sum per task.

    Memory: bf16/fp16 inputs are computed in float32 with float32 logits; the weight is cast
    4096 vocabulary rows at a time, never whole (plus a float32 weight-gradient accumulator
    when it is trainable).
    """
    if active_backend() == CPP:
        return torch.ops.multitune.linear_cross_entropy(
            hidden,
            weight,
            labels,
            ignore_index,
            chunk_size,
            COUNT_ON_DEVICE if num_labelled is None else num_labelled,
        )
    return reference_linear_cross_entropy(hidden, weight, labels, ignore_index)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The unfused computation: full [N, V] logits, then ``F.cross_entropy(reduction='none')``."""
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


def register_kernels() -> None:
    """Fake and autograd kernels for the C++ op; called once the extension is loaded."""
    register_linear_logprob_kernels(OP_NAME)

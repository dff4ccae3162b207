"""Python kernels shared by the two fused linear-head ops (mirrors csrc/linear_logprob_kernel).

Both ops compute ``sign * log_softmax(hidden @ weight.T)[target]`` per token; this module
gives them one dtype rule, one fake (meta) kernel and one autograd registration.
"""

from __future__ import annotations

from typing import Any

import torch

# Rows of labelled tokens per vocabulary projection: the [chunk, V] float32 logits buffer is
# the op's peak extra memory (1024 x 32000 x 4 B = 131 MB). Callers pass their config value.
DEFAULT_CHUNK_SIZE = 1024
# num_labelled when the caller does not know it: the op counts on the device (one host sync).
COUNT_ON_DEVICE = -1


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """float32 for every input precision, float64 when either input is float64.

    bf16/fp16 are promoted because a log-sum-exp over a large vocabulary in bf16 loses the
    target logit; float64 is kept so that gradcheck is meaningful.
    """
    return torch.float64 if torch.float64 in (hidden_dtype, weight_dtype) else torch.float32


def register_linear_logprob_kernels(op_name: str) -> None:
    """Register fake kernels and autograd for ``multitune::<op_name>`` and its backward op."""
    qualname = f"multitune::{op_name}"
    backward_op = getattr(torch.ops.multitune, f"{op_name}_backward").default

    @torch.library.register_fake(qualname)
    def _forward_fake(hidden, weight, targets, ignore_index, chunk_size, num_labelled):
        torch._check(hidden.shape[1] == weight.shape[1])
        torch._check(targets.shape[0] == hidden.shape[0])
        return hidden.new_empty((hidden.shape[0],), dtype=compute_dtype(hidden.dtype, weight.dtype))

    @torch.library.register_fake(f"{qualname}_backward")
    def _backward_fake(
        grad,
        hidden,
        weight,
        targets,
        ignore_index,
        chunk_size,
        num_labelled,
        hidden_requires_grad,
        weight_requires_grad,
    ):
        # A gradient that is not requested comes back empty: schemas cannot return None.
        grad_hidden = hidden.new_empty(hidden.shape if hidden_requires_grad else (0,))
        grad_weight = weight.new_empty(weight.shape if weight_requires_grad else (0,))
        return grad_hidden, grad_weight

    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        hidden, weight, targets, ignore_index, chunk_size, num_labelled = inputs
        # Only inputs are saved: the backward recomputes logits chunk by chunk.
        ctx.save_for_backward(hidden, weight, targets)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.num_labelled = num_labelled

    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        hidden, weight, targets = ctx.saved_tensors
        # A frozen lm_head (LoRA) skips the [V, H] weight gradient entirely.
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden, grad_weight = backward_op(
            grad,
            hidden,
            weight,
            targets,
            ctx.ignore_index,
            ctx.chunk_size,
            ctx.num_labelled,
            need_hidden,
            need_weight,
        )
        return (
            grad_hidden if need_hidden else None,
            grad_weight if need_weight else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)

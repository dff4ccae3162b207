"""One optimizer step with token-exact gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitune.losses.causal_lm import next_token_targets, token_losses
from multitune.models.lora import decoder_and_head


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm is NaN/inf; the step is not applied."""


@dataclass
class StepResult:
    loss: torch.Tensor  # token-mean loss over the whole accumulation window (detached)
    grad_norm: torch.Tensor
    num_tokens: int  # answer tokens in the window
    num_input_tokens: int  # non-pad tokens in the window
    task_loss_sums: torch.Tensor  # [num_tasks] summed answer-token losses
    task_token_counts: torch.Tensor  # [num_tasks]


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    task_loss_weights: torch.Tensor,
    num_tasks: int,
    window_tokens: int | None = None,
) -> StepResult:
    """Forward/backward every micro-batch; gradients end normalised by the window's token count.

    Each micro-batch contributes sum(weighted token losses) / N, with N the answer tokens of the
    whole window, so 1 x batch 8 and 8 x batch 1 produce the same gradient. Under data
    parallelism ``window_tokens`` is N over all ranks (this rank holds a share of the window);
    by default N counts this rank's micro-batches.
    """
    decoder, head = decoder_and_head(model)
    device = task_loss_weights.device
    targets = [next_token_targets(mb["labels"]).to(device) for mb in micro_batches]
    num_tokens = (
        int(sum(int((t != -100).sum()) for t in targets))
        if window_tokens is None
        else window_tokens
    )
    if num_tokens == 0:
        raise ValueError("an accumulation window holds no answer tokens")
    total = torch.zeros((), device=device)
    task_sums = torch.zeros(num_tasks, device=device)
    task_counts = torch.zeros(num_tasks, device=device)
    num_input_tokens = 0
    for mb, target in zip(micro_batches, targets):
        mask = mb["attention_mask"].to(device)
        num_input_tokens += int(mask.sum())
        hidden = decoder(
            input_ids=mb["input_ids"].to(device), attention_mask=mask
        ).last_hidden_state
        losses = token_losses(hidden, head, target)  # [B, T]
        per_example = losses.sum(dim=1)
        tasks = mb["task_index"].to(device)
        weighted = (per_example * task_loss_weights[tasks]).sum()
        (weighted / num_tokens).backward()
        total += per_example.sum().detach()
        task_sums.index_add_(0, tasks, per_example.detach())
        task_counts.index_add_(0, tasks, (target != -100).sum(dim=1).float())
    return StepResult(
        loss=total / num_tokens,
        grad_norm=torch.zeros(()),
        num_tokens=num_tokens,
        num_input_tokens=num_input_tokens,
        task_loss_sums=task_sums,
        task_token_counts=task_counts,
    )


def clip_and_check(model: torch.nn.Module, max_norm: float | None, step: int) -> torch.Tensor:
    """Clip gradients and refuse to step on a NaN/inf loss or gradient."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2) give a DTensor norm
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        raise NonFiniteError(
            f"step {step}: gradient norm is {norm.item()}; lower train.lr or check the data"
        )
    return norm

"""Token-level causal LM loss that projects only the answer positions onto the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multitune.data.formatting import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Shift labels left by one: position t predicts token t+1; the last position predicts none."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def token_losses(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """Per-position cross-entropy [B, T], 0 where the target is ignored.

    Only labelled positions go through ``head``, so memory is O(answer tokens x vocab) rather than
    O(all tokens x vocab); logits are upcast to float32 for a stable log-softmax.
    """
    mask = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if not mask.any():
        # Contributes nothing, but runs the head like any other batch: the graph stays
        # connected, and under FSDP every rank runs the same forwards and collectives.
        return out + head(hidden[:, :1]).sum() * 0.0
    logits = head(hidden[mask]).float()
    out[mask] = F.cross_entropy(logits, targets[mask], reduction="none")
    return out


def token_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """Per-position log p(target) [B, T], 0 where the target is ignored."""
    return -token_losses(hidden, head, targets)

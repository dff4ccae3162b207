"""Token-level causal LM loss through the fused head + cross-entropy op (answer positions only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from multitune.data.formatting import IGNORE_INDEX
from multitune.ops import linear_cross_entropy, linear_token_logprobs


def next_token_targets(
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    sequence_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shift labels left by one: position t predicts token t+1; the last position predicts none.

    With ``position_ids`` of a packed row (restarting at 0 for each example), the last token of
    an example predicts nothing either, so no target crosses an example border; with
    ``sequence_index`` (each token's example, as in a prefix-sharing row whose positions do not
    restart), the border is where that index changes.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts_next = position_ids[:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(starts_next, IGNORE_INDEX)
    if sequence_index is not None:
        border = sequence_index[:, 1:] != sequence_index[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(border, IGNORE_INDEX)
    return targets


def head_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The [V, H] matrix a bias-free output projection multiplies by, or None.

    None for heads the fused op cannot express (a bias, LoRA on lm_head). peft's
    ``ModulesToSaveWrapper`` answers ``.weight`` with the active copy (the trained one, or the
    original under ``disable_adapter()``), which is what its forward uses.
    """
    if isinstance(head, BaseTunerLayer) or getattr(head, "bias", None) is not None:
        return None
    weight = getattr(head, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def token_losses(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """Per-position cross-entropy [B, T] in float32, 0 where the target is ignored.

    Only labelled positions reach the vocabulary: they are gathered first, then projected and
    scored chunk by chunk inside ``ops.linear_cross_entropy`` (C++), so neither [tokens x vocab]
    nor [answer tokens x vocab] logits are kept for the backward pass.
    """
    return _labelled_positions(hidden, head, targets, linear_cross_entropy, sign=1.0)


def token_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """Per-position log p(target) [B, T] in float32 (``ops.linear_token_logprobs``), 0 where
    the target is ignored."""
    return _labelled_positions(hidden, head, targets, linear_token_logprobs, sign=-1.0)


def _labelled_positions(hidden, head, targets, fused_op, sign: float) -> torch.Tensor:
    mask = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    labelled = True
    if not mask.any():
        # No labelled position (e.g. a rank's filler micro-batch): score one position whose
        # target is ignored (value 0, zero gradient) through the same path as any batch, so the
        # graph stays connected and every rank runs the same modules and collectives (FSDP).
        mask = torch.zeros_like(mask)
        mask.view(-1)[0] = True
        labelled = False
    selected, wanted = hidden[mask], targets[mask]
    weight = head_weight(head)
    if weight is None:
        values = sign * F.cross_entropy(head(selected).float(), wanted, reduction="none")
    else:
        # The selection already counted the labelled rows: the op need not wait for the device.
        count = selected.shape[0] if labelled else 0
        values = fused_op(selected, weight, wanted, IGNORE_INDEX, num_labelled=count).float()
    out[mask] = values
    return out

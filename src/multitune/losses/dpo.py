"""Preference losses on summed sequence log-probs: sigmoid DPO (with label smoothing) and IPO.

Pure functions of four [pairs] tensors: the policy's and the reference's log p(answer | prompt)
for the chosen and the rejected answer, each summed over the answer tokens. The optional SFT
term lives in the DPO step, which knows the chosen answer's token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    losses: torch.Tensor  # [pairs], not reduced, so accumulation can normalise by pair count
    chosen_rewards: torch.Tensor  # [pairs] beta * (policy - reference), detached
    rejected_rewards: torch.Tensor  # [pairs]


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Per-pair loss and implicit rewards.

    With h = (pi_c - ref_c) - (pi_r - ref_r):
    - ``sigmoid`` (DPO, Rafailov et al. 2023): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h),
      e = ``label_smoothing`` (conservative DPO; 0 = plain DPO);
    - ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2.
    The rewards are beta * (policy - reference) for each answer, as logged by DPO trainers.
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * margin)
    elif kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}; use 'sigmoid' or 'ipo'")
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * (policy_chosen - reference_chosen)).detach(),
        rejected_rewards=(beta * (policy_rejected - reference_rejected)).detach(),
    )

"""Preference losses on sequence log-probs: sigmoid DPO (with label smoothing) and IPO.

Pure functions of four [pairs] tensors: the policy's and the reference's log p(answer | prompt)
for the chosen and the rejected answer, each summed over the answer tokens. IPO also takes each
answer's token count and works on the per-token mean (see ``preference_loss``). The optional SFT
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
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PreferenceLoss:
    """Per-pair loss and implicit rewards.

    With h = (pi_c - ref_c) - (pi_r - ref_r):
    - ``sigmoid`` (DPO, Rafailov et al. 2023): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h),
      e = ``label_smoothing`` (conservative DPO; 0 = plain DPO);
    - ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2, with every log-prob divided by its
      answer's token count (``chosen_tokens``/``rejected_tokens``, [pairs]) first. The paper
      writes sequence log-probs, but IPO regresses h onto the fixed target 1 / (2 beta): summed,
      h grows with the answers' length, so one beta would mean a different pull for a one-token
      label and a 200-token answer. The per-token mean keeps h on one scale (as TRL does).
    The rewards are beta * (policy - reference) for each answer, as logged by DPO trainers (of
    the per-token means for IPO).
    """
    if kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs each answer's token count")
        policy_chosen, reference_chosen = (
            policy_chosen / chosen_tokens,
            reference_chosen / chosen_tokens,
        )
        policy_rejected = policy_rejected / rejected_tokens
        reference_rejected = reference_rejected / rejected_tokens
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

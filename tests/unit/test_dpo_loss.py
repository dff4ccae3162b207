"""DPO/IPO losses against their formulas, on hand-computed log-probs."""

from __future__ import annotations

import pytest
import torch

from multitune.losses.dpo import preference_loss

# Two pairs: policy/reference summed log-probs of the chosen and the rejected answer.
# Pair 0: h = (-1.0 + 1.5) - (-2.0 + 1.5) = 1.0;  pair 1: h = (-3 + 2) - (-1 + 2) = -2.0.
POLICY_CHOSEN = torch.tensor([-1.0, -3.0])
POLICY_REJECTED = torch.tensor([-2.0, -1.0])
REFERENCE_CHOSEN = torch.tensor([-1.5, -2.0])
REFERENCE_REJECTED = torch.tensor([-1.5, -2.0])


def _loss(kind, beta=0.1, smoothing=0.0):
    return preference_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta, kind, smoothing
    )


def test_sigmoid_dpo_matches_formula():
    # -log sigmoid(0.1 * 1.0) = log(1 + e^-0.1); -log sigmoid(0.1 * -2.0) = log(1 + e^0.2)
    out = _loss("sigmoid")
    assert out.losses.tolist() == pytest.approx([0.6443966600735709, 0.7981388693815918])


def test_label_smoothing_mixes_both_directions():
    # 0.9 * log(1 + e^-0.1) + 0.1 * log(1 + e^0.1)
    out = _loss("sigmoid", smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(0.6543966600735709)


def test_ipo_matches_formula():
    # (h - 1/(2*0.1))^2 = (1 - 5)^2, (-2 - 5)^2
    assert _loss("ipo").losses.tolist() == pytest.approx([16.0, 49.0])


def test_rewards_are_beta_times_the_log_ratio():
    out = _loss("sigmoid")
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.1])


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    rejected = POLICY_REJECTED.clone().requires_grad_()
    preference_loss(
        chosen, rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1
    ).losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown preference loss 'hinge'"):
        _loss("hinge")

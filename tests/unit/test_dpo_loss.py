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


def test_ipo_on_per_token_means_matches_a_hand_computation():
    # Pair 0: chosen 4 tokens, policy -4 (mean -1.0) vs reference -6 (mean -1.5); rejected 2
    # tokens, policy -5 (mean -2.5) vs reference -3 (mean -1.5).
    # h = (-1.0 + 1.5) - (-2.5 + 1.5) = 1.5; beta 0.1: (1.5 - 5)^2 = 12.25.
    # Pair 1: chosen 1 token, -3 vs -2; rejected 3 tokens, -3 vs -6: h = -1 - 1 = -2; 49.
    policy = torch.tensor([-4.0, -3.0]), torch.tensor([-5.0, -3.0])
    reference = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -6.0])
    tokens = torch.tensor([4, 1]), torch.tensor([2, 3])
    out = preference_loss(*policy, *reference, 0.1, "ipo", 0.0, *tokens)
    assert out.losses.tolist() == pytest.approx([12.25, 49.0])
    # Summed log-probs would give h = 2 - (-2) = 4 and -1 - 3 = -4: another loss.
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.1])


def test_ipo_target_scale_does_not_depend_on_answer_length():
    # Every answer twice as long with the same per-token log-probs: the same loss, where summed
    # log-probs would double h against the fixed 1/(2 beta) target.
    policy = torch.tensor([-4.0, -3.0]), torch.tensor([-5.0, -3.0])
    reference = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -6.0])
    tokens = torch.tensor([4, 1]), torch.tensor([2, 3])
    short = preference_loss(*policy, *reference, 0.1, "ipo", 0.0, *tokens)
    doubled = preference_loss(
        *(2 * p for p in policy),
        *(2 * r for r in reference),
        0.1,
        "ipo",
        0.0,
        *(2 * t for t in tokens),
    )
    torch.testing.assert_close(doubled.losses, short.losses)


def test_ipo_without_token_counts_is_an_error():
    with pytest.raises(ValueError, match="token count"):
        _loss("ipo")


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

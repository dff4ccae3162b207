"""The DPO window step on the real tiny model: pair-exact accumulation and the loss it optimises."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from tests.unit.test_training import grads, lora_model

from multitune.config.schema import DpoConfig, TinyModelConfig
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.data.prefix_sharing import shared_prefix_length
from multitune.losses.dpo import preference_loss
from multitune.models.tiny import build_tiny_model
from multitune.training.dpo_step import (
    FillerPairs,
    TokenizedPair,
    dpo_window_step,
    pair_logprobs,
    sequence_logprobs,
    share_pair_prompts,
)


def random_pairs(vocab: int) -> list[TokenizedPair]:
    """Four pairs sharing a prompt each, with answers of different lengths."""
    g = torch.Generator().manual_seed(1)
    pairs = []
    for i, (prompt, chosen, rejected) in enumerate([(7, 2, 4), (15, 5, 1), (9, 1, 6), (20, 3, 3)]):
        head = torch.randint(20, vocab, (prompt,), generator=g).tolist()
        sides = []
        for answer in (chosen, rejected):
            tail = torch.randint(20, vocab, (answer,), generator=g).tolist()
            labels = [IGNORE_INDEX] * prompt + tail
            sides.append(TokenizedExample(head + tail, labels, prompt, 0, i, False))
        pairs.append(TokenizedPair(sides[0], sides[1], i))
    return pairs


def plain_logprob(model, example: TokenizedExample) -> torch.Tensor:
    """log p(answer | prompt) from a full-logits forward of one unpadded sequence."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
    labels = torch.tensor(example.labels[1:])
    mask = labels != IGNORE_INDEX
    return F.log_softmax(logits.float(), -1)[mask].gather(1, labels[mask, None]).sum()


def test_sequence_logprobs_match_a_plain_forward(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    pairs = random_pairs(len(tiny_tokenizer))
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with torch.no_grad():
        batched = sequence_logprobs(model, examples, tiny_tokenizer.pad_token_id)
        plain = torch.stack([plain_logprob(model, e) for e in examples])
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_window_loss_and_gradient_equal_the_formula_and_split_exactly(tiny_tokenizer, loss):
    model = lora_model(tiny_tokenizer)
    pairs = random_pairs(len(tiny_tokenizer))
    pad = tiny_tokenizer.pad_token_id
    cfg = DpoConfig(beta=0.5, loss=loss, sft_weight=0.3)
    reference = torch.tensor([[-30.0, -31.0], [-60.0, -12.0], [-11.0, -70.0], [-33.0, -35.0]])

    # The objective written out from a plain forward: mean preference loss + SFT term per token.
    chosen = torch.stack([plain_logprob(model, p.chosen) for p in pairs])
    rejected = torch.stack([plain_logprob(model, p.rejected) for p in pairs])
    lengths = [torch.tensor([p.chosen.num_answer_tokens for p in pairs])]
    lengths.append(torch.tensor([p.rejected.num_answer_tokens for p in pairs]))
    expected = preference_loss(
        chosen, rejected, reference[:, 0], reference[:, 1], 0.5, loss, 0.0, *lengths
    )
    chosen_tokens = 2 + 5 + 1 + 3
    objective = expected.losses.mean() - 0.3 * chosen.sum() / chosen_tokens
    objective.backward()
    plain_grads = grads(model)
    model.zero_grad()

    one = dpo_window_step(model, [pairs], reference, cfg, pad)
    one_grads = grads(model)
    model.zero_grad()
    four = dpo_window_step(model, [[p] for p in pairs], reference, cfg, pad)
    four_grads = grads(model)

    assert one.num_pairs == four.num_pairs == 4
    assert one.num_chosen_tokens == chosen_tokens
    torch.testing.assert_close(one.loss, objective.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(four.loss, objective.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.correct, four.correct)
    # atol 1e-5: the log-probs come from the fused op (chunked float32 log-sum-exp), whose
    # rounding differs from the plain head's in the last bits; IPO's square amplifies that.
    for name in plain_grads:
        torch.testing.assert_close(one_grads[name], plain_grads[name], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(four_grads[name], plain_grads[name], rtol=1e-3, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())


def test_rank_shares_with_global_counts_and_a_filler_sum_to_the_whole_window(tiny_tokenizer):
    # What two ranks compute for one global batch of 3 pairs: rank 0 holds two, rank 1 one and a
    # filler (its share of the short batch ran out). Divided by the window's global counts, the
    # shares' gradients and losses add up to the one-process window's; the filler adds nothing.
    model = lora_model(tiny_tokenizer)
    pairs = random_pairs(len(tiny_tokenizer))[:3]
    pad = tiny_tokenizer.pad_token_id
    cfg = DpoConfig(beta=0.5, sft_weight=0.3)
    reference = torch.tensor([[-30.0, -31.0], [-60.0, -12.0], [-11.0, -70.0]])

    whole = dpo_window_step(model, [pairs[:2], pairs[2:]], reference, cfg, pad)
    whole_grads = grads(model)
    model.zero_grad()
    window = (3, sum(p.chosen.num_answer_tokens for p in pairs))
    rank0 = dpo_window_step(model, [pairs[:2]], reference, cfg, pad, window)
    rank1 = dpo_window_step(model, [pairs[2:], FillerPairs(pairs[:1])], reference, cfg, pad, window)
    summed_grads = grads(model)

    assert (rank0.num_pairs, rank1.num_pairs) == (2, 1)
    assert rank1.num_input_tokens == sum(
        len(e.input_ids) for e in (pairs[2].chosen, pairs[2].rejected)
    )
    torch.testing.assert_close(rank0.loss + rank1.loss, whole.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0.correct + rank1.correct, whole.correct)
    for name in whole_grads:
        torch.testing.assert_close(summed_grads[name], whole_grads[name], rtol=1e-4, atol=1e-7)
    # Divided by its own count instead, a share's loss would be off: the window counts matter.
    alone = dpo_window_step(model, [pairs[2:]], reference, cfg, pad)
    assert alone.loss.item() > 2 * rank1.loss.item()


def test_policy_loaded_for_dpo_starts_at_zero_reward_with_lora_dropout(tiny_tokenizer, tmp_path):
    # An SFT adapter trained with lora.dropout 0.5: the DPO policy loaded from it must score each
    # pair as its cached (eval-mode) reference does, so at step 0 every implicit reward is 0 and
    # the sigmoid loss is log 2, although the loop trains in train mode.
    from multitune.recipes.dpo import compute_reference_logprobs, load_policy

    lora_model(tiny_tokenizer, dropout=0.5).save_pretrained(tmp_path / "adapter")
    pairs = random_pairs(len(tiny_tokenizer))
    pad = tiny_tokenizer.pad_token_id
    cfg = DpoConfig(beta=0.5, sft_weight=0.0)  # the preference loss alone

    def first_step(policy):
        reference = compute_reference_logprobs(policy, pairs, pad, batch_size=8)
        policy.train()
        torch.manual_seed(0)
        return dpo_window_step(policy, [pairs], reference, cfg, pad)

    base = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0)
    step = first_step(load_policy(base, tmp_path / "adapter"))
    assert step.chosen_reward_sum.item() == 0.0
    assert step.rejected_reward_sum.item() == 0.0
    torch.testing.assert_close(step.loss, torch.tensor(math.log(2)), rtol=1e-6, atol=0)

    # The same adapter loaded as peft does (dropout on) starts off zero: what the fix prevents.
    base = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0)
    with_dropout = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    step = first_step(with_dropout)
    assert abs(step.chosen_reward_sum.item()) > 1e-3


def test_shared_prompt_logprobs_and_window_step_equal_unshared(tiny_tokenizer):
    """Each pair's prompt computed once, chosen and rejected behind it: the same log-probs,
    DPO loss and LoRA gradients as both sides run whole."""
    from tests.unit.test_prefix_sharing import assert_relative_close

    model = lora_model(tiny_tokenizer)
    pairs = random_pairs(len(tiny_tokenizer))
    pad = tiny_tokenizer.pad_token_id
    shared_pairs = share_pair_prompts(pairs, True, "sdpa")
    # The prompt stops one token before the first answer token (it predicts that token).
    assert [p.shared_prompt for p in shared_pairs] == [6, 14, 8, 19]
    cfg = DpoConfig(beta=0.5, sft_weight=0.3)
    reference = torch.tensor([[-30.0, -31.0], [-60.0, -12.0], [-11.0, -70.0], [-33.0, -35.0]])

    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with torch.no_grad():
        plain = sequence_logprobs(model, examples, pad)
        shared = pair_logprobs(model, shared_pairs, pad)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=0)

    whole = dpo_window_step(model, [pairs[:3], pairs[3:]], reference, cfg, pad)
    whole_grads = grads(model)
    model.zero_grad()
    once = dpo_window_step(model, [shared_pairs[:3], shared_pairs[3:]], reference, cfg, pad)
    torch.testing.assert_close(once.loss, whole.loss, rtol=1e-5, atol=0)
    assert once.num_input_tokens == whole.num_input_tokens - (6 + 14 + 8 + 19)
    for name, grad in grads(model).items():
        assert_relative_close(grad, whole_grads[name])


def test_reference_table_with_shared_prompts_equals_unshared(tiny_tokenizer):
    from multitune.recipes.dpo import compute_reference_logprobs

    model = lora_model(tiny_tokenizer)
    pairs = random_pairs(len(tiny_tokenizer))
    pad = tiny_tokenizer.pad_token_id
    plain = compute_reference_logprobs(model, pairs, pad, batch_size=3)
    shared = compute_reference_logprobs(model, share_pair_prompts(pairs, True, "sdpa"), pad, 3)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=0)
    assert (plain < 0).all()


def test_pairs_sharing_one_token_or_under_flash_attention_run_unshared(tiny_tokenizer):
    pairs = random_pairs(len(tiny_tokenizer))
    assert share_pair_prompts(pairs, "auto", "flash_attention_2") == pairs
    assert share_pair_prompts(pairs, False, "sdpa") == pairs
    one = pairs[1]
    # The rejected side's prompt differs from its second token on: one token in common.
    ids = one.rejected.input_ids
    rejected = dataclasses.replace(one.rejected, input_ids=[ids[0], ids[1] + 1, *ids[2:]])
    assert shared_prefix_length([one.chosen, rejected]) == 1
    (lone,) = share_pair_prompts([TokenizedPair(one.chosen, rejected, 0)], True, "sdpa")
    assert lone.shared_prompt == 0
    with torch.no_grad():
        model = lora_model(tiny_tokenizer)
        logps = pair_logprobs(model, [lone], tiny_tokenizer.pad_token_id)
        plain = sequence_logprobs(model, [one.chosen, rejected], tiny_tokenizer.pad_token_id)
    assert torch.equal(logps, plain)

"""One DPO optimizer step (chosen + rejected through the decoder) and sequence log-probs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from multitune.config.schema import DpoConfig
from multitune.data.batching import collate
from multitune.data.formatting import TokenizedExample
from multitune.data.prefix_sharing import (
    prefixes_to_share,
    row_width_scale,
    share_prefixes,
    shared_prefix_length,
    worth_sharing,
)
from multitune.distributed.strategy import set_gradient_sync
from multitune.losses.causal_lm import next_token_targets, token_logprobs
from multitune.losses.dpo import preference_loss
from multitune.models.lora import decoder_and_head
from multitune.training.step import (
    decoder_inputs,
    example_sums,
    micro_batch_targets,
    sharing_mask_dtype,
)


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair tokenized with the SFT formatting; ``index`` is its reference-table row.

    ``shared_prompt``: leading tokens of both sides that one forward computes once, chosen and
    rejected behind them (``share_pair_prompts``); 0: each side runs whole.
    """

    chosen: TokenizedExample
    rejected: TokenizedExample
    index: int
    shared_prompt: int = 0


class FillerPairs(list):
    """Pairs a rank runs through forward and backward only so that sharded layers see as many
    passes on every rank (its share of a short last batch ran out); they add nothing."""


@dataclass
class DpoStepResult:
    """Sums over the accumulation window, on device (the log window divides at flush)."""

    loss: torch.Tensor  # the window's objective: mean preference loss (+ weighted SFT term)
    num_pairs: int
    num_input_tokens: int
    chosen_reward_sum: torch.Tensor
    rejected_reward_sum: torch.Tensor
    correct: torch.Tensor  # pairs whose chosen reward beats the rejected one
    chosen_nll_sum: torch.Tensor  # summed -log p over chosen answer tokens
    num_chosen_tokens: int


def sequence_logprobs(
    model: torch.nn.Module, examples: list[TokenizedExample], pad_id: int
) -> torch.Tensor:
    """Summed log p(answer tokens | prompt) per example [B], on the labelled positions only."""
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    batch = collate(examples, pad_id)
    hidden = decoder(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    ).last_hidden_state
    targets = next_token_targets(batch["labels"]).to(device)
    return token_logprobs(hidden, head, targets).sum(dim=1)


def share_pair_prompts(
    pairs: list[TokenizedPair], mode: str | bool, attention: str
) -> list[TokenizedPair]:
    """``pairs`` with ``shared_prompt`` set per ``data.share_prefix`` under ``attention``.

    Each pair's prompt is the longest unlabelled prefix its two sides share
    (``shared_prefix_length``, checked per pair); auto shares when the prompts average at
    least a quarter of the tokens, as a task's prefix must for SFT.
    """
    prompts = [shared_prefix_length([p.chosen, p.rejected]) for p in pairs]
    sides = [len(e.input_ids) for p in pairs for e in (p.chosen, p.rejected)]
    mean_prompt = sum(prompts) / max(1, len(prompts))
    (on,) = prefixes_to_share(mode, attention, [mean_prompt], [sum(sides) / max(1, len(sides))])
    if not on:
        return pairs
    # A pair whose sides share a single token runs unshared, as a task would.
    return [replace(p, shared_prompt=worth_sharing(prompt)) for p, prompt in zip(pairs, prompts)]


def pair_logprobs(model: torch.nn.Module, pairs: list[TokenizedPair], pad_id: int) -> torch.Tensor:
    """Summed answer log-probs [2 x pairs]: every chosen side, then every rejected side.

    Pairs with a ``shared_prompt`` run as one prefix-sharing micro-batch: each prompt once,
    its two answers behind it (``grouped_logprobs``); otherwise both sides padded whole.
    """
    if not any(p.shared_prompt for p in pairs):
        return sequence_logprobs(
            model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id
        )
    sums = grouped_logprobs(
        model, [[p.chosen, p.rejected] for p in pairs], [p.shared_prompt for p in pairs], pad_id
    )
    return sums.view(len(pairs), 2).T.reshape(-1)


def grouped_logprobs(
    model: torch.nn.Module,
    groups: list[list[TokenizedExample]],
    prompts: list[int],
    pad_id: int,
) -> torch.Tensor:
    """Summed answer log-probs of every example of ``groups``, in order, in one forward.

    The examples of a group start with the same ``prompts[g]`` tokens (0: run whole), laid
    down once with the group's answers behind it (``data.prefix_sharing``); the prompts of a
    row form a prefix tree, so what different groups start with (a task's instruction, the
    system block) is computed once too.
    """
    examples = [replace(e, task_index=g) for g, group in enumerate(groups) for e in group]
    # Rows at least as long as the longest group laid out shared, so every group stays one
    # block.
    longest = max(
        prompt + sum(len(e.input_ids) - prompt for e in group)
        for group, prompt in zip(groups, prompts)
    )
    decoder, head = decoder_and_head(model)
    batch = share_prefixes(
        examples, pad_id, longest, prompts, width_scale=row_width_scale(decoder.config)
    )
    device = next(model.parameters()).device
    inputs = decoder_inputs(batch, device, mask_dtype=sharing_mask_dtype(decoder))
    hidden = decoder(**inputs).last_hidden_state
    targets = micro_batch_targets(batch).to(device)
    return example_sums(token_logprobs(hidden, head, targets), batch)


def dpo_window_step(
    model: torch.nn.Module,
    micro_batches: list[list[TokenizedPair]],
    reference: torch.Tensor,
    cfg: DpoConfig,
    pad_id: int,
    window: tuple[int, int] | None = None,
) -> DpoStepResult:
    """Forward/backward every micro-batch of pairs against cached reference log-probs.

    ``reference`` is [pairs, 2] (chosen, rejected), indexed by ``TokenizedPair.index``. The
    preference loss is normalised by the pairs of the whole window and the SFT term by the chosen
    answer tokens of the window, so the gradient does not depend on how the window is split.
    ``window``: (pairs, chosen answer tokens) of the whole window over all ranks, when these
    micro-batches are one rank's share of it (default: these micro-batches are all of it).
    The result's counts and sums are this rank's own.
    """
    device = reference.device
    counted = [mb for mb in micro_batches if not isinstance(mb, FillerPairs)]
    num_pairs = sum(len(mb) for mb in counted)
    num_chosen_tokens = sum(p.chosen.num_answer_tokens for mb in counted for p in mb)
    window_pairs, window_chosen_tokens = window or (num_pairs, num_chosen_tokens)
    if window_pairs == 0:
        raise ValueError("an accumulation window holds no preference pairs")
    zero = torch.zeros((), device=device)
    total, chosen_sum, rejected_sum, correct, nll_sum = zero, zero, zero, zero, zero
    num_input_tokens = 0
    for number, pairs in enumerate(micro_batches):
        set_gradient_sync(model, number == len(micro_batches) - 1)  # one reduction per step
        examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        # Chosen and rejected in one forward pass: one decoder call per micro-batch.
        logps = pair_logprobs(model, pairs, pad_id)
        if isinstance(pairs, FillerPairs):
            (logps.sum() * 0.0).backward()  # the backward pass the sharded layers wait for
            continue
        num_input_tokens += sum(len(e.input_ids) for e in examples)
        num_input_tokens -= sum(p.shared_prompt for p in pairs)  # computed once per pair
        n = len(pairs)
        ref = reference[torch.tensor([p.index for p in pairs], device=device)]
        lengths = torch.tensor([e.num_answer_tokens for e in examples], device=device)
        out = preference_loss(
            logps[:n],
            logps[n:],
            ref[:, 0],
            ref[:, 1],
            cfg.beta,
            cfg.loss,
            cfg.label_smoothing,
            chosen_tokens=lengths[:n],
            rejected_tokens=lengths[n:],
        )
        loss = out.losses.sum() / window_pairs
        nll = -logps[:n].sum()
        if cfg.sft_weight:
            loss = loss + cfg.sft_weight * nll / window_chosen_tokens
        loss.backward()
        total = total + loss.detach()
        chosen_sum = chosen_sum + out.chosen_rewards.sum()
        rejected_sum = rejected_sum + out.rejected_rewards.sum()
        correct = correct + (out.chosen_rewards > out.rejected_rewards).sum()
        nll_sum = nll_sum + nll.detach()
    return DpoStepResult(
        loss=total,
        num_pairs=num_pairs,
        num_input_tokens=num_input_tokens,
        chosen_reward_sum=chosen_sum,
        rejected_reward_sum=rejected_sum,
        correct=correct,
        chosen_nll_sum=nll_sum,
        num_chosen_tokens=num_chosen_tokens,
    )

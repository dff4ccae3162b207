"""Summed answer log-probs of several answers to one prompt, with the prompt run once.

Mining DPO negatives scores every candidate answer of a question (10 labels for banking77) and
the candidates differ only in their last few tokens: on SmolLM2 a banking77 candidate is about
145 tokens, 139 of them the prompt. Causal attention makes the prompt's keys and values
independent of what follows, so the common prefix runs once (batch 1, KV cache kept), the cache
is repeated for every candidate, and only the candidates' own tokens run behind it. The log-probs
are those of ``dpo_step.sequence_logprobs`` over the full sequences (tested to 1e-5).
"""

from __future__ import annotations

import torch

from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.losses.causal_lm import next_token_targets, token_logprobs
from multitune.models.lora import decoder_and_head
from multitune.training.dpo_step import sequence_logprobs


def shared_prefix_length(examples: list[TokenizedExample]) -> int:
    """Tokens every example starts with, ending before the token that predicts any example's
    first labelled token (each suffix must hold that token, since its output scores the label)."""
    first_labelled = min(
        next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels))
        for e in examples
    )
    common = 0
    limit = max(first_labelled - 1, 0)
    first = examples[0].input_ids
    while common < limit and all(e.input_ids[common] == first[common] for e in examples):
        common += 1
    return common


@torch.no_grad()
def grouped_sequence_logprobs(
    model: torch.nn.Module, examples: list[TokenizedExample], pad_id: int
) -> torch.Tensor:
    """Summed log p(answer | prompt) per example [len(examples)], like ``sequence_logprobs``,
    for examples that continue one prompt (the common token prefix is found, never assumed; with
    none, the examples run whole)."""
    shared = shared_prefix_length(examples)
    if shared == 0:
        return sequence_logprobs(model, examples, pad_id)
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    prefix = torch.tensor([examples[0].input_ids[:shared]], device=device)
    cache = decoder(input_ids=prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(examples))

    width = max(len(e.input_ids) for e in examples) - shared
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for row, example in enumerate(examples):
        n = len(example.input_ids) - shared
        ids[row, :n] = torch.tensor(example.input_ids[shared:])
        labels[row, :n] = torch.tensor(example.labels[shared:])
        mask[row, shared : shared + n] = 1
    positions = torch.arange(shared, shared + width).expand(len(examples), -1)
    hidden = decoder(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    targets = next_token_targets(labels).to(device)
    return token_logprobs(hidden, head, targets).sum(dim=1)

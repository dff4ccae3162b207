"""Run the prompt prefix every row of an evaluation batch starts with once, not once per row.

Evaluation prompts are short texts behind long identical markup: the chat template's system
block, the instruction, a label list. Causal attention makes a token's keys and values depend
only on the tokens before it, so a prefix every prompt of a batch shares has the same keys and
values in every row. One batch-1 forward computes them; each row's own tokens then continue from
a copy of that cache, at the positions they had all along. No row sees anything it did not see
before, so predictions cannot change: only the order of float sums does (a loss moves in its
last bits).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from multitune.data.batching import collate, left_pad
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.distributed.process_group import all_ranks_done
from multitune.losses.causal_lm import next_token_targets

# Fewer shared tokens than this and the extra batch-1 forward (its fixed cost: a kernel launch
# per layer on a GPU) saves too little to pay for itself.
MIN_SHARED_TOKENS = 16


@dataclass
class PromptBatch:
    """Left-padded prompts ready for a forward: ``ids`` (batch x columns, CPU) are what still has
    to run, ``mask`` covers the cached shared columns and then ``ids``'s, and ``cache`` holds the
    shared prefix's keys and values once per row (None when nothing is shared)."""

    shared: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    cache: DynamicCache | None


def prefix_sharing_allowed(model: torch.nn.Module, setting: str | bool = "auto") -> bool:
    """Whether evaluation shares prompt prefixes under ``data.share_prefix`` = ``setting``:
    ``auto`` is on except under flash-attention, where rows padded between the prefix and their
    own tokens have not been checked against the unshared path (no GPU so far)."""
    if setting is False:
        return False
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return setting is True or not attn.startswith("flash")


def real_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, as training saw them (pads wherever they are)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each at least one token of
    its own: a row's next-token logits come from its last prompt position, which must run in the
    row's own forward."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    for column in range(max(shortest - 1, 0)):
        if any(p[column] != first[column] for p in prompts[1:]):
            return column
    return max(shortest - 1, 0)


def shared_prefix_cache(
    decoder: torch.nn.Module,
    prompts: list[list[int]],
    device,
    share: bool,
    most_shared: int | None = None,
) -> tuple[list[int], DynamicCache | None]:
    """The prefix the prompts share and its keys and values, one copy per row, from one batch-1
    forward; ``([], None)`` unless ``share`` and the prefix is at least ``MIN_SHARED_TOKENS``
    long (counting at most ``most_shared`` tokens)."""
    num_shared = shared_prefix_length(prompts) if share and len(prompts) > 1 else 0
    if most_shared is not None:
        num_shared = min(num_shared, max(most_shared, 0))
    # Under a process group the prefix forward runs on every rank or on none: sharded layers
    # all-gather in each forward, so every rank must run as many.
    if not share or not all_ranks_done(num_shared >= MIN_SHARED_TOKENS, device):
        return [], None
    shared = prompts[0][:num_shared]
    cache = decoder(input_ids=torch.tensor([shared], device=device), use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(prompts))
    return shared, cache


def prompt_batch(
    decoder: torch.nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    device,
    share: bool,
    most_shared: int | None = None,
) -> PromptBatch:
    """The batch's prompts, their common prefix already run (``shared_prefix_cache``).

    Each row's remainder is left-padded behind the prefix, so pads sit between the prefix and
    the row's own tokens: the mask hides them, ``real_token_positions`` skips them, and every
    row's last prompt token still sits in the last column.
    """
    shared, cache = shared_prefix_cache(decoder, prompts, device, share, most_shared)
    ids, own_mask = left_pad([p[len(shared) :] for p in prompts], pad_id)
    mask = torch.cat([torch.ones((len(prompts), len(shared)), dtype=torch.long), own_mask], dim=1)
    return PromptBatch(shared, ids, mask, cache)


def most_shared_tokens(batch: list[TokenizedExample]) -> int:
    """The most tokens a shared prefix may take when the pass reads the batch's loss: each
    labelled token's prediction must come from the rows' own forward, so the prefix ends before
    the first one (a multi-turn prompt may train earlier answers; a single-turn one labels
    nothing before the answer)."""
    return (
        min(
            next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels))
            for e in batch
        )
        - 1
    )


def labelled_rows_forward(
    decoder: torch.nn.Module,
    batch: list[TokenizedExample],
    pad_id: int,
    device,
    share: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and next-token targets of the batch's rows after their shared prompt prefix
    (``shared_prefix_cache``; the whole rows when none is shared), right-padded behind it: the
    answer loss of evaluation and the candidate scores of DPO mining read their labels here."""
    prompts = [e.input_ids[: e.prompt_length] for e in batch]
    shared, cache = shared_prefix_cache(decoder, prompts, device, share, most_shared_tokens(batch))
    n = len(shared)
    rests = [replace(e, input_ids=e.input_ids[n:], labels=e.labels[n:]) for e in batch]
    tensors = collate(rests, pad_id)
    mask = torch.cat([torch.ones((len(batch), n), dtype=torch.long), tensors["attention_mask"]], 1)
    mask = mask.to(device)
    hidden = decoder(
        input_ids=tensors["input_ids"].to(device),
        attention_mask=mask,
        position_ids=real_token_positions(mask)[:, n:],
        past_key_values=cache,
        use_cache=cache is not None,
    ).last_hidden_state
    return hidden, next_token_targets(tensors["labels"]).to(device)

"""Shared prompt prefixes: each task's common leading tokens computed once per micro-batch.

A task's examples start with the same tokens (the chat template's system block, the fixed
instruction, the label list). Causal attention makes those tokens' activations independent of
what follows, so a micro-batch lays each task's prefix down once and puts that task's examples
behind it as suffixes: a suffix token attends to its prefix and, causally, to its own suffix;
its ``position_ids`` continue from the prefix length, as in the example run alone. Loss and
gradients equal the unshared layout's (the backward sums every suffix's gradient through the
one prefix).

Layout (``share_prefixes``): rows of at most ``data.max_seq_len`` tokens holding blocks; a block
is one task's prefix followed by suffixes of its examples (a task with more suffixes than fit
one row gets a block, and a prefix copy, per row), or a lone example of a task that shares
nothing. Per token, ``block_index`` names its block (-1 on padding) and ``sequence_index`` its
example (-1 on prefix and padding); ``prefix_sharing_mask`` turns the two into the attention
mask. flash-attention takes no such mask: there sharing is off (``prefixes_to_share``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.ops import plan_packing

# auto shares a task's prefix when it is at least this fraction of the task's mean tokens: below
# it, the saved compute hardly pays for the mask, which sdpa cannot skip like a causal one.
AUTO_MIN_PREFIX_FRACTION = 0.25
# A prefix of a single token (the template's first) saves one token per example: not worth a
# mask of its own, so such a task runs unshared even with share_prefix: true.
MIN_PREFIX_TOKENS = 2


def shared_prefix_length(examples: Sequence[TokenizedExample]) -> int:
    """The longest token prefix common to all ``examples`` that holds no trained token.

    Checked against every example. It also stops one token before each example's first labelled
    token: the prefix's last position predicts the suffix's first token, and a prediction from a
    shared position cannot be trained for each example, so that token must carry no label.
    """
    if not examples:
        return 0
    first = examples[0].input_ids
    length = len(first)
    for example in examples:
        labels = example.labels
        labelled = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        length = min(length, labelled - 1, len(example.input_ids) - 1)
        ids = example.input_ids
        common = 0
        while common < length and ids[common] == first[common]:
            common += 1
        length = common
    return max(length, 0)


def prefixes_to_share(
    mode: str | bool,
    attention: str,
    prefixes: Sequence[int],
    mean_tokens: Sequence[float],
) -> list[int]:
    """Per task, the prefix length a micro-batch shares (0: the task runs unshared).

    ``mode`` is ``data.share_prefix``; ``attention`` the model's resolved attention
    implementation; ``prefixes`` and ``mean_tokens`` each task's ``shared_prefix_length`` and
    mean training-example length.
    """
    if mode is False:
        return [0] * len(prefixes)
    if attention.startswith("flash"):
        if mode is True:
            raise ValueError(
                f"data.share_prefix: true needs a custom attention mask, which {attention} "
                "cannot take; set model.attn_implementation: sdpa or data.share_prefix: auto"
            )
        return [0] * len(prefixes)
    shared = []
    for prefix, mean in zip(prefixes, mean_tokens):
        worth_it = mode is True or prefix >= AUTO_MIN_PREFIX_FRACTION * mean
        shared.append(prefix if worth_it and prefix >= MIN_PREFIX_TOKENS else 0)
    return shared


def share_prefixes(
    batch: list[TokenizedExample],
    pad_id: int,
    capacity: int,
    prefix_lengths: Sequence[int],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Lay ``batch`` out with each task's shared prefix once per row (see the module doc).

    ``prefix_lengths[t]`` is task t's shared prefix (``prefixes_to_share``). Returns
    ``input_ids``, ``labels``, ``position_ids``, ``sequence_index``, ``block_index`` ([rows,
    width]) and ``task_index`` ([len(batch)]).
    """
    blocks = _blocks(batch, capacity, prefix_lengths)
    lengths = [
        prefix + sum(len(batch[i].input_ids) - prefix for i in members)
        for prefix, members in blocks
    ]
    (bins,) = plan_packing(lengths, capacity, num_ranks=1, seed=seed)
    bins = [bin_ for bin_ in bins if bin_]
    width = max(sum(lengths[b] for b in bin_) for bin_ in bins)
    shape = (len(bins), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    block_index = torch.full(shape, -1, dtype=torch.long)
    for row, bin_ in enumerate(bins):
        start = 0
        for number in bin_:
            prefix, members = blocks[number]
            head = batch[members[0]].input_ids[:prefix]
            input_ids[row, start : start + prefix] = torch.tensor(head, dtype=torch.long)
            position_ids[row, start : start + prefix] = torch.arange(prefix)
            block_index[row, start : start + prefix] = number
            start += prefix
            for index in members:
                example = batch[index]
                assert example.input_ids[:prefix] == head, "a task's examples differ in prefix"
                n = len(example.input_ids) - prefix
                span = slice(start, start + n)
                input_ids[row, span] = torch.tensor(example.input_ids[prefix:])
                labels[row, span] = torch.tensor(example.labels[prefix:])
                position_ids[row, span] = torch.arange(prefix, prefix + n)
                sequence_index[row, span] = index
                block_index[row, span] = number
                start += n
        position_ids[row, start:] = torch.arange(width - start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "sequence_index": sequence_index,
        "block_index": block_index,
        "task_index": torch.tensor([e.task_index for e in batch], dtype=torch.long),
    }


def _blocks(
    batch: list[TokenizedExample], capacity: int, prefix_lengths: Sequence[int]
) -> list[tuple[int, list[int]]]:
    """(prefix length, example indices) per block: a task's examples behind one prefix, as many
    as fit ``capacity``, or one example alone (prefix 0) for a task that shares nothing."""
    blocks: list[tuple[int, list[int]]] = []
    open_block: dict[int, int] = {}  # task -> its block still taking suffixes
    used: list[int] = []
    for index, example in enumerate(batch):
        prefix = prefix_lengths[example.task_index]
        if prefix == 0:
            blocks.append((0, [index]))
            used.append(len(example.input_ids))
            continue
        suffix = len(example.input_ids) - prefix
        number = open_block.get(example.task_index)
        if number is None or used[number] + suffix > capacity:
            number = len(blocks)
            open_block[example.task_index] = number
            blocks.append((prefix, []))
            used.append(prefix)
        blocks[number][1].append(index)
        used[number] += suffix
    return blocks


def prefix_sharing_mask(
    mb: dict[str, torch.Tensor], device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The [rows, 1, T, T] attention mask of a ``share_prefixes`` micro-batch.

    A token sees earlier tokens of its block that are prefix or of its own example; padding
    sees earlier padding (never an empty row, which would give NaN). Boolean (True: attend) for
    sdpa; with a float ``dtype``, additive (0 or the dtype's minimum) as eager attention adds it.
    """
    block = mb["block_index"].to(device)
    sequence = mb["sequence_index"].to(device)
    width = block.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same_block = block[:, :, None] == block[:, None, :]
    visible = (sequence == -1)[:, None, :] | (sequence[:, :, None] == sequence[:, None, :])
    mask = (causal & same_block & visible)[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )

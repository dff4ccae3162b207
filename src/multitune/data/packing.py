"""Padding-free packing: several tokenized examples per row, each attending only to itself.

A packed micro-batch holds exactly the examples the unpacked one would (``micro_batch_size``
consecutive examples of the step's global batch), laid out in as few rows of at most
``data.max_seq_len`` tokens as ``ops.plan_packing`` finds. So the global batch, the data
position and the token-exact loss normalisation count examples as before; only the padding and
the number of rows change.

Row layout: ``position_ids`` restart at 0 at every example. With no ``attention_mask``,
transformers reads the restarts as example borders: sdpa/eager get a block-diagonal causal mask,
flash-attention 2 runs its varlen kernel on the segments. Row padding is a segment of its own
(positions 0, 1, ...) with no labels. Targets never cross a border (``next_token_targets``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from multitune.config.schema import DataConfig
from multitune.data.batching import collate
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.data.prefix_sharing import share_prefixes
from multitune.ops import plan_packing


def micro_batches(
    examples: list[TokenizedExample],
    micro_batch_size: int,
    pad_id: int,
    data: DataConfig,
    seed: int = 0,
    prefix_lengths: Sequence[int] = (),
    width_scale: float | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Split one optimizer step's examples into micro-batches, packed when ``data.packing``."""
    return [
        micro_batch(
            examples[i : i + micro_batch_size], pad_id, data, seed, prefix_lengths, width_scale
        )
        for i in range(0, len(examples), micro_batch_size)
    ]


def micro_batch(
    examples: list[TokenizedExample],
    pad_id: int,
    data: DataConfig,
    seed: int = 0,
    prefix_lengths: Sequence[int] = (),
    width_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch of ``examples``: packed when ``data.packing``, else right-padded.

    When a task of the micro-batch shares a prefix (``prefix_lengths[task]`` > 0, see
    ``data.prefix_sharing``), the micro-batch is laid out with each shared prefix once instead,
    in packed rows whatever ``data.packing`` says: rows of ``data.max_seq_len`` tokens, or with
    ``width_scale`` (``prefix_sharing.attention_width`` of the model) as long as is cheapest.
    """
    if prefix_lengths and any(prefix_lengths[e.task_index] for e in examples):
        return share_prefixes(examples, pad_id, data.max_seq_len, prefix_lengths, seed, width_scale)
    if not data.packing:
        return collate(examples, pad_id)
    return pack(examples, pad_id, data.max_seq_len, seed)


def pack(
    batch: list[TokenizedExample], pad_id: int, capacity: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Pack ``batch`` into rows of at most ``capacity`` tokens.

    Returns ``input_ids``, ``labels``, ``position_ids`` ([rows, width]), ``sequence_index``
    ([rows, width]: index into ``batch`` of each token's example, -1 on padding) and
    ``task_index`` ([len(batch)], per example). No ``attention_mask``: see the module doc.
    """
    lengths = [len(e.input_ids) for e in batch]
    # One rank: a micro-batch is already this rank's share. plan_packing balances ranks when
    # given more, for a loop that packs the global batch before slicing it.
    (bins,) = plan_packing(lengths, capacity, num_ranks=1, seed=seed)
    bins = [bin_ for bin_ in bins if bin_]
    width = max(sum(lengths[i] for i in bin_) for bin_ in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    sequence_index = torch.full((len(bins), width), -1, dtype=torch.long)
    for row, bin_ in enumerate(bins):
        start = 0
        for index in bin_:
            example, n = batch[index], lengths[index]
            input_ids[row, start : start + n] = torch.tensor(example.input_ids)
            labels[row, start : start + n] = torch.tensor(example.labels)
            position_ids[row, start : start + n] = torch.arange(n)
            sequence_index[row, start : start + n] = index
            start += n
        position_ids[row, start:] = torch.arange(width - start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "sequence_index": sequence_index,
        "task_index": torch.tensor([e.task_index for e in batch], dtype=torch.long),
    }

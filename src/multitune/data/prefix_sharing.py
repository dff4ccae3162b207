"""Shared prompt prefixes: each task's common leading tokens computed once per micro-batch.

A task's examples start with the same tokens (the chat template's system block, the fixed
instruction, the label list). Causal attention makes those tokens' activations independent of
what follows, so a micro-batch lays each task's prefix down once and puts that task's examples
behind it as suffixes: a suffix token attends to its prefix and, causally, to its own suffix;
its ``position_ids`` continue from the prefix length, as in the example run alone. Loss and
gradients equal the unshared layout's (the backward sums every suffix's gradient through the
one prefix).

Layout (``share_prefixes``): rows holding blocks; a block is one task's prefix followed by
suffixes of its examples (a task with more suffixes than fit one row gets a block, and a prefix
copy, per row), or a lone example of a task that shares nothing. Within a row the blocks'
prefixes form a radix tree, so a start several tasks have in common (the chat template's
system block) is computed once too. Per token, ``node_index`` names its prefix-tree node (-1 on
padding) and ``sequence_index`` its example (-1 on prefix and padding); with
``node_ancestors`` ``prefix_sharing_mask`` turns them into the attention mask, and
``attention_segments`` into the runs that sdpa computes one call each (``models.attention``).
flash-attention takes no such mask: there sharing is off (``prefixes_to_share``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.ops import plan_packing

# auto shares a task's prefix when it is at least this fraction of the task's mean tokens: below
# it, the saved compute hardly pays for the mask, which sdpa cannot skip like a causal one.
AUTO_MIN_PREFIX_FRACTION = 0.25
# Masked attention (sdpa's flash/efficient kernels with an explicit mask) runs at about half
# the rate of the linear layers' matrix multiplies: 2.2x slower measured on the demo on CPU.
MASKED_ATTENTION_SLOWDOWN = 2.0
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


def worth_sharing(prefix: int) -> int:
    """``prefix`` if it is at least ``MIN_PREFIX_TOKENS`` long, else 0 (run unshared)."""
    return prefix if prefix >= MIN_PREFIX_TOKENS else 0


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
        shared.append(worth_sharing(prefix) if worth_it else 0)
    return shared


def attention_width(config) -> float:
    """The row width at which a layer's masked attention costs as much as its linear layers,
    per token, for a decoder with this ``config`` (a transformers config).

    Linear layers cost ``linear`` multiply-adds per token whatever the row; attention under a
    prefix-sharing mask costs ``2 x heads x head_dim`` per token per key it computes (every
    key of its segment, ``models.attention``: no kernel skips the masked ones), and runs at
    about half the matrix multiplies' rate (``MASKED_ATTENTION_SLOWDOWN``). SmolLM2-135M:
    3072 / 2 = 1536 (the CPU gave 1400 for one masked call over a row).
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    linear = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    linear += 3 * hidden * config.intermediate_size  # gated MLP (Llama and its kind)
    return linear / (2 * heads * head_dim) / MASKED_ATTENTION_SLOWDOWN


def row_width_scale(config) -> float | None:
    """``share_prefixes``'s ``width_scale`` for a model: its ``attention_width`` under sdpa,
    whose kernels never hold a [T x T] score matrix; None (rows of ``data.max_seq_len``) for
    eager attention, which keeps one per head and layer for the backward."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    return attention_width(config)


def share_prefixes(
    batch: list[TokenizedExample],
    pad_id: int,
    capacity: int,
    prefix_lengths: Sequence[int],
    seed: int = 0,
    width_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Lay ``batch`` out with each task's shared prefix once per row (see the module doc).

    ``prefix_lengths[t]`` is task t's shared prefix (``prefixes_to_share``). Rows hold at most
    ``capacity`` tokens; with ``width_scale`` (``attention_width``) the row length is chosen
    instead, see ``_capacities``. Returns ``input_ids``, ``labels``, ``position_ids``,
    ``sequence_index``, ``node_index`` ([rows, width]), ``node_ancestors`` ([nodes, nodes])
    and ``task_index`` ([len(batch)]).
    """
    if width_scale is None:
        rows, parents = _layout(batch, capacity, prefix_lengths, seed)
    else:

        def cost(layout: tuple[list[list[_Piece]], list[int]]) -> float:
            return len(layout[0]) * _width(layout[0]) + _segment_pairs(*layout) / width_scale

        candidates = _capacities(batch, capacity)
        rows, parents = min((_layout(batch, c, prefix_lengths, seed) for c in candidates), key=cost)
    width = _width(rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    node_index = torch.full(shape, -1, dtype=torch.long)
    for row, pieces in enumerate(rows):
        start = 0
        for piece in pieces:
            n = len(piece.tokens)
            span = slice(start, start + n)
            input_ids[row, span] = torch.tensor(piece.tokens, dtype=torch.long)
            if piece.labels is not None:
                labels[row, span] = torch.tensor(piece.labels, dtype=torch.long)
            position_ids[row, span] = torch.arange(piece.position, piece.position + n)
            sequence_index[row, span] = piece.sequence
            node_index[row, span] = piece.node
            start += n
        position_ids[row, start:] = torch.arange(width - start)
    ancestors = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        while parent != -1:
            ancestors[node, parent] = True
            parent = parents[parent]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "sequence_index": sequence_index,
        "node_index": node_index,
        "node_ancestors": ancestors,
        "task_index": torch.tensor([e.task_index for e in batch], dtype=torch.long),
    }


@dataclass(frozen=True)
class _Piece:
    """A run of one row's tokens: a prefix node's (``sequence`` -1, no labels) or an example's
    suffix (or a whole lone example) behind ``node``; positions start at ``position``."""

    tokens: Sequence[int]
    labels: Sequence[int] | None
    position: int
    sequence: int
    node: int


def _row_pieces(
    batch: list[TokenizedExample], row: list[tuple[int, list[int]]], parents: list[int]
) -> list[_Piece]:
    """One row's pieces, in order: its blocks' prefixes as a radix tree, each suffix after its
    prefix; ``parents`` gets each new node's parent (-1: none).

    Blocks of different tasks in a row often start alike (the chat template's system block, a
    shared instruction): the tree lays each common run down once, so the row computes it once.
    A node's tokens come before everything below it, which is all causal attention needs.
    """
    pieces: list[_Piece] = []

    def add_node(parent: int) -> int:
        parents.append(parent)
        return len(parents) - 1

    def suffixes(prefix: int, members: list[int], node: int) -> None:
        head = batch[members[0]].input_ids[:prefix]
        for index in members:
            example = batch[index]
            assert example.input_ids[:prefix] == head, "a task's examples differ in prefix"
            pieces.append(
                _Piece(example.input_ids[prefix:], example.labels[prefix:], prefix, index, node)
            )

    def visit(blocks: list[tuple[int, list[int]]], start: int, parent: int) -> None:
        heads = [batch[members[0]].input_ids[:prefix] for prefix, members in blocks]
        end = len(os.path.commonprefix(heads))  # they all share heads[0][:start]
        node = parent
        if end > start:
            node = add_node(parent)
            pieces.append(_Piece(heads[0][start:end], None, start, -1, node))
        branches: dict[int, list[tuple[int, list[int]]]] = {}
        for block, head in zip(blocks, heads):
            if len(head) == end:
                suffixes(*block, node)
            else:
                branches.setdefault(head[end], []).append(block)
        for branch in branches.values():
            visit(branch, end, node)

    shared = [block for block in row if block[0]]
    if shared:
        visit(shared, 0, -1)
    for prefix, members in row:
        if not prefix:  # a lone example of a task that shares nothing
            suffixes(0, members, add_node(-1))
    return pieces


def _rows(
    batch: list[TokenizedExample], capacity: int, prefix_lengths: Sequence[int], seed: int
) -> list[list[tuple[int, list[int]]]]:
    """The blocks (``_blocks``) of ``batch`` packed into rows of at most ``capacity`` tokens
    (counting each block's whole prefix: rows whose blocks share a start come out shorter)."""
    blocks = _blocks(batch, capacity, prefix_lengths)
    lengths = [
        prefix + sum(len(batch[i].input_ids) - prefix for i in members)
        for prefix, members in blocks
    ]
    (bins,) = plan_packing(lengths, capacity, num_ranks=1, seed=seed)
    return [[blocks[number] for number in bin_] for bin_ in bins if bin_]


def _layout(
    batch: list[TokenizedExample], capacity: int, prefix_lengths: Sequence[int], seed: int
) -> tuple[list[list[_Piece]], list[int]]:
    """The rows (as pieces) of ``batch`` in rows of at most ``capacity`` tokens, and the parent
    of each prefix-tree node."""
    parents: list[int] = []
    rows = [
        _row_pieces(batch, row, parents) for row in _rows(batch, capacity, prefix_lengths, seed)
    ]
    return rows, parents


def _width(rows: list[list[_Piece]]) -> int:
    return max(sum(len(piece.tokens) for piece in row) for row in rows)


def _segment_pairs(rows: list[list[_Piece]], parents: list[int]) -> int:
    """The query-key pairs the attention computes in segments (``attention_segments``): per
    tree node's run, its length times its keys (the prefix tokens above it and the run)."""
    prefix = {}  # node -> its prefix tokens
    runs: dict[int, int] = {}  # node -> tokens of its run (prefix and suffixes)
    for row in rows:
        for piece in row:
            runs[piece.node] = runs.get(piece.node, 0) + len(piece.tokens)
            if piece.sequence == -1:
                prefix[piece.node] = len(piece.tokens)
    pairs = 0
    for node, length in runs.items():
        above, parent = 0, parents[node]
        while parent != -1:
            above += prefix.get(parent, 0)
            parent = parents[parent]
        pairs += length * (above + length)
    return pairs


def _capacities(batch: list[TokenizedExample], capacity: int) -> list[int]:
    """The row capacities to try, smallest first, from the longest example up to the whole
    micro-batch in one row (``share_prefixes`` keeps the cheapest layout).

    Rows of ``data.max_seq_len`` suit examples but not blocks: a task's prefix with its
    suffixes is one lump (banking77's 108 + 3 x 32 tokens in the demo), and lumps pack into
    fixed rows with much padding (36% of the demo's positions). Every position of the
    rectangular batch costs the linear layers, and attention the pairs it computes in segments
    (``_segment_pairs``), each pair 1 / width_scale of a position: the cost
    rows x width + pairs / width_scale favours one row (a tree shared by all, no padding) until
    attention outweighs the padding that more rows would add.
    """
    longest = max(len(e.input_ids) for e in batch)
    most = sum(len(e.input_ids) for e in batch)
    candidates, size = {capacity, most}, float(longest)
    while size < most:
        candidates.add(int(size))
        size *= 1.25
    return sorted(candidates)


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

    A token sees earlier prefix tokens of its node and the nodes above it, and earlier tokens
    of its own example; padding sees earlier padding (never an empty row, which would give
    NaN). Boolean (True: attend) for sdpa; with a float ``dtype``, additive (0 or the dtype's
    minimum) as eager attention adds it.
    """
    node = mb["node_index"].to(device)
    sequence = mb["sequence_index"].to(device)
    ancestors = mb["node_ancestors"].to(device)
    width = node.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    real = node >= 0
    lineage = ancestors[node.clamp(min=0)[:, :, None], node.clamp(min=0)[:, None, :]]
    lineage &= real[:, :, None] & (real & (sequence == -1))[:, None, :]
    own = (sequence[:, :, None] == sequence[:, None, :]) & (sequence >= 0)[:, :, None]
    padding = ~real[:, :, None] & ~real[:, None, :]
    mask = (causal & (lineage | own | padding))[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )


def attention_segments(
    mb: dict[str, torch.Tensor], mask: torch.Tensor
) -> list[list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]] | None:
    """Per row of a ``share_prefixes`` micro-batch, its runs of one prefix-tree node, for
    ``models.attention.segmented_sdpa``: (start, end, key positions, ``mask``'s part).

    A node's run is its prefix tokens and the suffixes right behind it; its keys are the prefix
    tokens of the nodes above it and the run itself, which holds every key ``mask`` lets the
    run see. Padding gets no keys (None). None when a node's tokens are not one run (a layout
    this module does not make): the caller keeps the whole mask.
    """
    node = mb["node_index"].tolist()
    sequence = mb["sequence_index"].tolist()
    ancestors = mb["node_ancestors"]
    rows = []
    for row, (nodes, sequences) in enumerate(zip(node, sequence)):
        runs: list[tuple[int, int, int]] = []  # (node, start, end)
        for position, value in enumerate(nodes):
            if runs and runs[-1][0] == value:
                runs[-1] = (value, runs[-1][1], position + 1)
            else:
                runs.append((value, position, position + 1))
        if len({value for value, _, _ in runs}) != len(runs):
            return None
        prefix_tokens = {}  # node -> positions of its prefix tokens
        segments = []
        for value, start, end in runs:
            if value < 0:
                segments.append((start, end, None, None))
                continue
            own = [p for p in range(start, end) if sequences[p] == -1]
            prefix_tokens[value] = own
            above = [n for n in ancestors[value].nonzero().flatten().tolist() if n != value]
            if any(n not in prefix_tokens for n in above):
                return None
            keys = [p for n in above for p in prefix_tokens[n]]
            keys = torch.tensor(keys + list(range(start, end)), device=mask.device)
            segments.append((start, end, keys, mask[row : row + 1, :, start:end][..., keys]))
        rows.append(segments)
    return rows

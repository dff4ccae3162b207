"""Deterministic packing of examples into bins of ``capacity`` tokens, balanced over ranks.

The algorithm is documented in csrc/plan_packing.cpp; ``reference_plan_packing`` below is a
plain Python copy of it (same tie-breaking, same hashes) that must give identical plans.

Uneven bin counts: every rank gets as many bins (steps) as the busiest rank. A rank with fewer
bins first splits its fullest multi-example bins; only if it has fewer examples than steps does
it receive empty bins ``[]``, which a training loop must run as zero-token steps so that
collective calls still line up across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from multitune.ops.extension import CPP, active_backend

Plan = list[list[list[int]]]  # rank -> bins (steps) -> example indices

_MASK = (1 << 64) - 1
_SHUFFLE_SALT = 0x5EED5EED5EED5EED


def plan_packing(
    lengths: Sequence[int] | torch.Tensor, capacity: int, num_ranks: int, seed: int
) -> Plan:
    """Pack examples into bins of at most ``capacity`` tokens and deal the bins to ranks.

    Args:
        lengths: token count of each example (list or 1-D integer tensor).
        capacity: tokens per bin (the packed sequence length).
        num_ranks: data-parallel ranks; each gets the same number of bins.
        seed: breaks ties between equal lengths and shuffles each rank's bin order.

    Returns:
        ``plan[rank][step]`` is the list of example indices packed together. Every example
        appears exactly once; per-rank token totals differ by at most the longest example.

    Raises:
        ValueError: an example is longer than ``capacity`` (the message names its index), a
            length is negative, or ``capacity`` / ``num_ranks`` is not positive.
    """
    if active_backend() != CPP:
        return reference_plan_packing(lengths, capacity, num_ranks, seed)
    lengths_tensor = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if lengths_tensor.dim() == 0 or lengths_tensor.numel() == 0:
        lengths_tensor = lengths_tensor.reshape(-1)
    flat, bin_sizes = torch.ops.multitune.plan_packing(lengths_tensor, capacity, num_ranks, seed)
    # One tolist() and list slicing: a tensor per bin would dominate the runtime.
    indices, bins, start = flat.tolist(), [], 0
    for size in bin_sizes.tolist():
        bins.append(indices[start : start + size])
        start += size
    num_steps = len(bins) // num_ranks
    return [bins[rank * num_steps : (rank + 1) * num_steps] for rank in range(num_ranks)]


def _mix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _hash_pair(a: int, b: int) -> int:
    return _mix64(_mix64(a) ^ b)


def _check_lengths(lengths: list[int], capacity: int, num_ranks: int) -> None:
    if capacity <= 0:
        raise ValueError(f"plan_packing: capacity must be positive, got {capacity}")
    if num_ranks <= 0:
        raise ValueError(f"plan_packing: num_ranks must be positive, got {num_ranks}")
    for index, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"plan_packing: example {index} has negative length {length}")
        if length > capacity:
            raise ValueError(
                f"plan_packing: example {index} has length {length}, longer than the packing "
                f"capacity {capacity}; truncate it or raise the capacity"
            )


def reference_plan_packing(
    lengths: Sequence[int] | torch.Tensor, capacity: int, num_ranks: int, seed: int
) -> Plan:
    """Plain Python (quadratic) copy of the C++ planner; same contract and same output."""
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.reshape(-1).tolist()
    lengths = [int(length) for length in lengths]
    _check_lengths(lengths, capacity, num_ranks)
    seed_bits = seed & _MASK

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], _hash_pair(seed_bits, i), i))
    loads = [0] * num_ranks
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for example in order:
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        per_rank[rank].append(example)
        loads[rank] += lengths[example]

    plan = [_best_fit_decreasing(examples, lengths, capacity) for examples in per_rank]
    num_steps = max(len(bins) for bins in plan)
    for rank, bins in enumerate(plan):
        _split_to_count(bins, num_steps, lengths)
        _shuffle_bins(bins, seed_bits, rank)
    return plan


def _best_fit_decreasing(examples: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    remaining: list[int] = []
    for example in examples:
        length = lengths[example]
        fits = [(space, i) for i, space in enumerate(remaining) if space >= length]
        if fits:
            _, best = min(fits)
            bins[best].append(example)
            remaining[best] -= length
        else:
            bins.append([example])
            remaining.append(capacity - length)
    return bins


def _split_to_count(bins: list[list[int]], num_bins: int, lengths: list[int]) -> None:
    while len(bins) < num_bins:
        splittable = [
            (sum(lengths[e] for e in bin_), -i) for i, bin_ in enumerate(bins) if len(bin_) >= 2
        ]
        if not splittable:
            bins.extend([] for _ in range(num_bins - len(bins)))
            return
        _, neg_id = max(splittable)
        halves: tuple[list[int], list[int]] = ([], [])
        tokens = [0, 0]
        for example in bins[-neg_id]:
            side = 0 if tokens[0] <= tokens[1] else 1
            halves[side].append(example)
            tokens[side] += lengths[example]
        bins[-neg_id] = halves[0]
        bins.append(halves[1])


def _shuffle_bins(bins: list[list[int]], seed_bits: int, rank: int) -> None:
    stream = _hash_pair(seed_bits ^ _SHUFFLE_SALT, rank)
    for i in range(len(bins), 1, -1):
        j = _hash_pair(stream, i - 1) % i
        bins[i - 1], bins[j] = bins[j], bins[i - 1]

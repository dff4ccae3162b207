"""Which examples make up an epoch when several tasks train together."""

from __future__ import annotations

import random

from multitune.config.schema import DataConfig


def task_probabilities(
    sizes: list[int], cfg: DataConfig, weights: list[float | None]
) -> list[float]:
    """Sampling probability per task: by size (default), by size^(1/T), or by explicit weights."""
    if cfg.mixing == "weights":
        missing = [i for i, w in enumerate(weights) if w is None]
        if missing:
            raise ValueError(
                f"data.mixing is 'weights' but tasks {missing} have no sampling_weight"
            )
        raw = [float(w) for w in weights]
    elif cfg.mixing == "temperature":
        raw = [size ** (1.0 / cfg.temperature) for size in sizes]
    else:
        raw = [float(size) for size in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def epoch_order(
    sizes: list[int], probabilities: list[float], seed: int, epoch: int
) -> list[tuple[int, int]]:
    """One epoch as (task index, example index) pairs, seeded by (seed, epoch).

    The epoch holds as many examples as all tasks together; task t contributes
    round(total x p_t) of them (largest remainder), cycling through its own shuffled examples
    when it is over-sampled, so no example repeats before every one of its task was seen.
    """
    rng = random.Random(f"{seed}-{epoch}")
    total = sum(sizes)
    exact = [total * p for p in probabilities]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    order: list[tuple[int, int]] = []
    for task, (size, count) in enumerate(zip(sizes, counts)):
        drawn: list[int] = []
        while len(drawn) < count and size:
            cycle = list(range(size))
            rng.shuffle(cycle)
            drawn.extend(cycle[: count - len(drawn)])
        order.extend((task, i) for i in drawn)
    rng.shuffle(order)
    return order

"""Deterministic, stratified train/validation split."""

from __future__ import annotations

import random
from collections import defaultdict


def split_indices(
    strata: list[str | None], validation_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split row indices into (train, validation), stratified by ``strata`` where given.

    Each stratum contributes round(fraction x its size) rows to validation, so the split is
    80/20 within one example per class. The result depends only on the inputs and ``seed``.
    """
    groups: dict[str | None, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        groups[stratum].append(index)
    rng = random.Random(seed)
    train, validation = [], []
    for stratum in sorted(groups, key=lambda s: (s is None, s or "")):
        members = groups[stratum][:]
        rng.shuffle(members)
        cut = round(len(members) * validation_fraction)
        validation.extend(members[:cut])
        train.extend(members[cut:])
    return sorted(train), sorted(validation)

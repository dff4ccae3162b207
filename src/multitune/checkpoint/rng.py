"""Capture and restore every random number generator a training run draws from.

The captured state holds only tensors, lists, tuples and plain numbers, so it round-trips through
``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_state() -> dict:
    """Python ``random``, numpy's global generator, torch CPU and (when present) every CUDA device."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # One state per visible device; reading a CUDA generator needs no context on that device.
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put every generator back where ``capture_rng_state`` found it."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        log.warning("checkpoint holds CUDA RNG state but CUDA is unavailable; not restored")
        return
    num_devices = torch.cuda.device_count()
    if len(cuda_states) != num_devices:
        log.warning(
            "checkpoint holds CUDA RNG state for %d devices, this process sees %d; "
            "restoring the first %d",
            len(cuda_states),
            num_devices,
            min(len(cuda_states), num_devices),
        )
    for device, device_state in enumerate(cuda_states[:num_devices]):
        torch.cuda.set_rng_state(device_state, device)

"""``train.compile``: torch.compile the decoder the training step runs."""

from __future__ import annotations

import logging

import torch

from multitune.models.lora import decoder_and_head

log = logging.getLogger(__name__)


def compiled_decoder(
    model: torch.nn.Module, enabled: bool, backend: str = "inductor"
) -> torch.nn.Module | None:
    """A compiled view of the model's decoder for training, or None when ``enabled`` is False.

    Only the training step uses it; evaluation and generation keep the eager model (their KV
    cache shapes change every token and would recompile). The compiled module shares the
    model's parameters, LoRA adapters included; the loss op stays outside the graph (it is a
    registered custom op with fake kernels, so compiling it too would also work). ``backend``
    is torch.compile's; tests use ``aot_eager`` (same graph capture, no code generation).
    """
    if not enabled:
        return None
    decoder, _ = decoder_and_head(model)
    layers = int(getattr(decoder.config, "num_hidden_layers", 0) or 0)
    low, high = estimate_compile_seconds(layers)
    log.info(
        "train.compile: the first training steps compile the decoder (%d layers), about "
        "%.0f-%.0f s before any speed-up, plus a recompile for each new batch shape; it pays off "
        "only on runs much longer than that (see README, torch.compile)",
        layers,
        low,
        high,
    )
    # dynamic=True: packed and padded micro-batches change rows and width every step.
    return torch.compile(decoder, dynamic=True, backend=backend)


def estimate_compile_seconds(num_layers: int) -> tuple[float, float]:
    """Rough (low, high) seconds to compile a forward + backward of ``num_layers`` layers.

    From this project's 2-core CPU machine (torch 2.13, inductor, see BENCHMARKS.md): the
    2-layer tiny model took 3 CPU-minutes for its first two batch shapes. A fixed cost plus a
    per-layer cost; a fast many-core or GPU host is quicker, a busy machine slower, hence the
    range. Not measured on a GPU.
    """
    fixed, per_layer = COMPILE_FIXED_S, COMPILE_PER_LAYER_S
    estimate = fixed + per_layer * num_layers
    return 0.5 * estimate, 2.0 * estimate


COMPILE_FIXED_S = 60.0
COMPILE_PER_LAYER_S = 15.0

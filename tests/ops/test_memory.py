"""Peak extra memory of the fused linear cross entropy stays O(chunk x V), not O(N x V).

CPU has no allocator peak counter like torch.cuda.max_memory_allocated, so the peak is read
from the profiler: with profile_memory=True every CPU allocation and free is recorded, and
replaying them in time order gives the high-water mark of bytes allocated inside the block.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from multitune.ops import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("cpp_backend")

NUM_TOKENS, VOCAB, HIDDEN = 2048, 32000, 64
NUM_LABELLED = NUM_TOKENS // 10
FULL_LOGITS_BYTES = NUM_TOKENS * VOCAB * 4  # 262 MB: what an unfused float32 head allocates


def peak_allocated_bytes(fn: Callable[[], None]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    sizes: list[tuple[int, int]] = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
    current = peak = 0
    for _, size in sorted(sizes):  # frees carry a negative size
        current += size
        peak = max(peak, current)
    return peak


@pytest.fixture(scope="module")
def sparse_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(NUM_TOKENS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5
    labels = torch.full((NUM_TOKENS,), -100)
    labelled = torch.randperm(NUM_TOKENS, generator=generator)[:NUM_LABELLED]
    labels[labelled] = torch.randint(0, VOCAB, (labelled.numel(),), generator=generator)
    return hidden, weight, labels


def forward_backward(hidden, weight, labels, chunk_size: int) -> Callable[[], None]:
    def run() -> None:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        linear_cross_entropy(h, w, labels, chunk_size=chunk_size).sum().backward()

    return run


def test_profiler_sees_a_full_logits_allocation():
    # Guards the measurement itself: a test that reads 0 for everything could never fail.
    peak = peak_allocated_bytes(lambda: torch.zeros(NUM_TOKENS, VOCAB).sum())
    assert FULL_LOGITS_BYTES <= peak < 1.01 * FULL_LOGITS_BYTES


def chunk_bytes(num_rows: int) -> int:
    return num_rows * VOCAB * 4


def test_peak_memory_is_far_below_full_logits(sparse_batch):
    hidden, weight, labels = sparse_batch
    peak = peak_allocated_bytes(forward_backward(hidden, weight, labels, chunk_size=256))
    inputs_and_grads = 2 * (hidden.numel() + weight.numel()) * 4  # clones + their .grad
    assert peak < FULL_LOGITS_BYTES / 4
    # Beyond inputs and grads, one [rows, V] float32 buffer: softmax and its gradient are
    # built in place. All 204 labelled rows fit in one chunk of 256.
    assert peak - inputs_and_grads < 1.2 * chunk_bytes(NUM_LABELLED)


def test_smaller_chunks_lower_the_peak(sparse_batch):
    hidden, weight, labels = sparse_batch
    large = peak_allocated_bytes(forward_backward(hidden, weight, labels, chunk_size=256))
    small = peak_allocated_bytes(forward_backward(hidden, weight, labels, chunk_size=32))
    assert large - small > 0.9 * (chunk_bytes(NUM_LABELLED) - chunk_bytes(32))


LLAMA3_VOCAB, BF16_HIDDEN, BF16_ROWS = 128256, 256, 64


def test_bf16_head_is_never_cast_to_float32_whole():
    # A frozen bf16 head (LoRA) at Llama 3's vocabulary: forward and backward stay within one
    # chunk's float32 logits plus a few MB (a 4096-row float32 slice of the weight and its
    # product), where casting the whole weight costs V x H x 4 bytes (131 MB here, 1.05 GB for
    # Llama 3.2 1B) on top.
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(LLAMA3_VOCAB, BF16_HIDDEN, generator=generator) / 16).bfloat16()
    hidden = torch.randn(BF16_ROWS, BF16_HIDDEN, generator=generator).bfloat16()
    labels = torch.randint(0, LLAMA3_VOCAB, (BF16_ROWS,), generator=generator)

    def run() -> None:
        h = hidden.clone().requires_grad_()
        losses = linear_cross_entropy(
            h, weight, labels, chunk_size=BF16_ROWS, num_labelled=BF16_ROWS
        )
        losses.sum().backward()

    peak = peak_allocated_bytes(run)
    chunk_logits = BF16_ROWS * LLAMA3_VOCAB * 4  # 32.8 MB
    whole_weight_in_float32 = LLAMA3_VOCAB * BF16_HIDDEN * 4  # 131 MB
    slice_and_product = 4096 * BF16_HIDDEN * 4 + BF16_ROWS * 4096 * 4  # 5.2 MB
    assert peak < chunk_logits + slice_and_product + 2 * 1024**2, peak
    assert peak < whole_weight_in_float32 / 2

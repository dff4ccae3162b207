"""What the plan assumes about each accelerator: memory, peak dense throughput, fixed overhead."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

GIB = 1024**3
MIB = 1024**2

# Part of device memory kept free for allocator fragmentation when deciding what fits.
USABLE_MEMORY_FRACTION = 0.95
# CUDA context + cuBLAS/NCCL workspaces + caching-allocator slack, per GPU process.
CUDA_OVERHEAD_BYTES = 1 * GIB
# fp32 FMA throughput per CPU thread we call "peak" (AVX2: 2 FMA units x 8 lanes x 2 flops at
# ~3 GHz is ~96 GFLOP/s; half of it is a realistic ceiling for torch's matmuls).
CPU_PEAK_TFLOPS_PER_THREAD = 0.05
# A CPU training process before its model: the interpreter, torch, transformers, peft, datasets,
# the tokenizer and the tokenized data (measured: about 580 MB RSS with SmolLM2's tokenizer and
# the three-task sample mix).
CPU_PROCESS_BYTES = 600 * MIB
# glibc's malloc keeps freed blocks from step to step (BENCHMARKS.md, bench/peer_trl.py): peak
# RSS exceeded the live bytes by about 2x the frozen weights plus 0.35x the activations. Fitted
# on SmolLM2-135M in float32 (1.1 GB kept with and without gradient checkpointing over the
# first steps, 1.65 GB over 30 steps without); the part that follows the weights is measured,
# not explained. With MALLOC_MMAP_THRESHOLD_=131072 both terms were about 0.
CPU_ALLOCATOR_WEIGHT_RETENTION = 2.0
CPU_ALLOCATOR_ACTIVATION_RETENTION = 0.35


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int  # total, as nvidia-smi reports it (host RAM for cpu)
    peak_tflops: float  # dense bf16 (fp32 for cpu), no sparsity
    overhead_bytes: int
    default_dtype: str  # what model.dtype=auto resolves to on it

    def as_dict(self) -> dict:
        return asdict(self)


GPUS = {
    "a100-40gb": Accelerator("a100-40gb", 40960 * MIB, 312.0, CUDA_OVERHEAD_BYTES, "bfloat16"),
    "a100-80gb": Accelerator("a100-80gb", 81920 * MIB, 312.0, CUDA_OVERHEAD_BYTES, "bfloat16"),
    "h100": Accelerator("h100", 81559 * MIB, 989.0, CUDA_OVERHEAD_BYTES, "bfloat16"),
    "h200": Accelerator("h200", 143771 * MIB, 989.0, CUDA_OVERHEAD_BYTES, "bfloat16"),
    "l40s": Accelerator("l40s", 46068 * MIB, 362.0, CUDA_OVERHEAD_BYTES, "bfloat16"),
    "a10g": Accelerator("a10g", 23028 * MIB, 125.0, CUDA_OVERHEAD_BYTES, "bfloat16"),
}
ACCELERATOR_NAMES = [*GPUS, "cpu"]


def cpu_accelerator() -> Accelerator:
    """This machine: its physical RAM, and torch's intra-op threads x a stated per-thread peak."""
    import torch  # here, so the CLI's parser stays light

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = torch.get_num_threads() * CPU_PEAK_TFLOPS_PER_THREAD
    return Accelerator("cpu", ram, peak, CPU_PROCESS_BYTES, "float32")


def get_accelerator(name: str) -> Accelerator:
    if name == "cpu":
        return cpu_accelerator()
    if name not in GPUS:
        raise ValueError(
            f"unknown --gpu-type {name!r}; choose one of {', '.join(ACCELERATOR_NAMES)}"
        )
    return GPUS[name]

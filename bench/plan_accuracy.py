"""How close is `multitune plan`? Predicted vs measured memory and step time on CPU.

Trains the built-in tiny model (LoRA, the SFT step helper, padded batches from ``collate``) for
a few forward/backward steps at several micro-batch sizes and sequence lengths, each in a fresh
subprocess, and compares with the planner:

- memory: peak RSS growth during the first forward/backward (VmHWM after resetting it, minus
  RSS before) vs the plan's activations + loss + recompute + gradients lines. glibc's mmap threshold is
  pinned so freed tensors go back to the OS and RSS tracks live memory.
- time: the faster of the next two steps (glibc's usual 32 MiB mmap threshold restored, as in a
  long run) vs plan FLOPs / (CPU peak x MFU), with the MFU the measurement implies.

Run: .venv/bin/python bench/plan_accuracy.py [--threads N]   (about a minute on 2 idle cores).
On a busy machine use --threads 1: OpenMP threads that wait on each other collapse under
oversubscription, which would measure the neighbours, not the plan.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

from peak_rss import peak_rss, reset_peak_rss  # bench/peak_rss.py, beside this script

SETTINGS = [  # micro-batch, sequence length, activation checkpointing
    (4, 128, False),
    (8, 256, False),
    (16, 256, False),
    (16, 256, True),
    (8, 512, False),
]
VOCAB = 4096  # padded vocabulary, so the planner knows it exactly


def bench_config(micro_batch: int, seq_len: int, checkpointing: bool):
    from multitune.config.schema import RunConfig

    return RunConfig.model_validate(
        {
            "model": {
                "name": "builtin:tiny-llama",
                "gradient_checkpointing": checkpointing,
                "tiny": {"size": "micro", "vocab_size": VOCAB},
            },
            "tasks": [{"name": "synthetic", "kind": "chat", "dataset": "unused"}],
            "data": {"max_seq_len": seq_len},
            "train": {"micro_batch_size": micro_batch},
        }
    )


def measure(micro_batch: int, seq_len: int, checkpointing: bool) -> dict:
    """Runs in the child process: build, then one measured step and two timed steps."""
    import gc

    import torch

    from multitune.data.batching import collate
    from multitune.data.formatting import TokenizedExample
    from multitune.models.loading import load_model_and_tokenizer
    from multitune.models.lora import apply_lora
    from multitune.training.step import accumulate_gradients

    cfg = bench_config(micro_batch, seq_len, checkpointing)
    corpus = [f"sample sentence number {i} about banking, claims and questions" for i in range(200)]
    model, tokenizer = load_model_and_tokenizer(cfg.model, corpus, 0, torch.device("cpu"))
    model = apply_lora(model, cfg.lora)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    generator = torch.Generator().manual_seed(0)

    def make_batch(rows: int, length: int) -> dict[str, torch.Tensor]:
        # Every token is a target (the plan's loss line is for that case); the last row is one
        # token short, so batches carry a padding mask as real ones do.
        examples = []
        for i in range(rows):
            ids = torch.randint(10, VOCAB, (length - (i == rows - 1),), generator=generator)
            examples.append(TokenizedExample(ids.tolist(), ids.tolist(), 0, 0, i, False))
        return collate(examples, tokenizer.pad_token_id)

    weights = torch.ones(1)
    # A small step first: one-time allocations (kernel workspaces, autograd engine) are not
    # what the plan predicts.
    accumulate_gradients(model, [make_batch(2, 16)], weights, 1)
    model.zero_grad(set_to_none=True)
    batch = make_batch(micro_batch, seq_len)
    gc.collect()
    before = reset_peak_rss()
    accumulate_gradients(model, [batch], weights, 1)
    peak = peak_rss()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 * 1024**2)  # M_MMAP_THRESHOLD: glibc's dynamic ceiling
    libc.mallopt(-1, 64 * 1024**2)  # M_TRIM_THRESHOLD: twice that, as glibc sets it
    times = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        accumulate_gradients(model, [batch], weights, 1)
        times.append(time.perf_counter() - start)
    return {"peak_growth_bytes": peak - before, "step_seconds": sorted(times)[0]}


def run_child(micro_batch: int, seq_len: int, checkpointing: bool, threads: int) -> dict:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="131072",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = [sys.executable, __file__, "--child", str(micro_batch), str(seq_len)]
    if checkpointing:
        args.append("--checkpointing")
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[2:]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(micro_batch: int, seq_len: int, checkpointing: bool) -> dict:
    from multitune.planning import build_plan

    cfg = bench_config(micro_batch, seq_len, checkpointing)
    tokens = micro_batch * seq_len
    plan = build_plan(cfg, 1, "cpu", None, num_tokens=tokens)
    lines = plan["memory"]["ddp"]
    return {
        "activations": lines["activations"],
        "loss": lines["loss"],
        "gradients": lines["gradients"],
        "memory_bytes": sum(lines[k] for k in ("activations", "loss", "recompute", "gradients")),
        "step_seconds": plan["time"]["epoch_seconds"],
        "flops": tokens * plan["compute"]["flops_per_token"],
        "peak_flops": plan["hardware"]["peak_tflops"] * 1e12,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, type=int, metavar=("MICRO_BATCH", "SEQ_LEN"))
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.checkpointing)))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the plan's CPU peak scales with the thread count
    threads = torch.get_num_threads()
    started = time.perf_counter()
    mib = 1024**2
    print(
        f"{'micro':>5} {'seq':>4} {'ckpt':>4} | {'pred MiB':>9} {'meas MiB':>9} {'err':>6} | "
        f"{'pred s':>7} {'meas s':>7} {'err':>6} {'MFU':>6}"
    )
    errors = []
    for micro_batch, seq_len, checkpointing in SETTINGS:
        predicted = predict(micro_batch, seq_len, checkpointing)
        measured = run_child(micro_batch, seq_len, checkpointing, threads)
        mem_err = predicted["memory_bytes"] / measured["peak_growth_bytes"] - 1
        time_err = predicted["step_seconds"] / measured["step_seconds"] - 1
        mfu = predicted["flops"] / measured["step_seconds"] / predicted["peak_flops"]
        errors.append(abs(mem_err))
        print(
            f"{micro_batch:>5} {seq_len:>4} {'on' if checkpointing else 'off':>4} | "
            f"{predicted['memory_bytes'] / mib:>9.1f} {measured['peak_growth_bytes'] / mib:>9.1f} "
            f"{mem_err:>+6.0%} | {predicted['step_seconds']:>7.3f} {measured['step_seconds']:>7.3f} "
            f"{time_err:>+6.0%} {mfu:>6.3f}"
        )
    print(
        f"memory: mean |error| {sum(errors) / len(errors):.0%}; time assumes MFU 0.35 of "
        f"{predicted['peak_flops'] / 1e12:.2f} TFLOP/s ({threads} threads); "
        f"ran in {time.perf_counter() - started:.0f} s"
    )
    load = os.getloadavg()[0]
    if load > os.cpu_count():
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; times are unreliable")


if __name__ == "__main__":
    main()

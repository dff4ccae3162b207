"""Gradient accumulation under FSDP2 reduces once per optimizer step, not once per micro-batch:
2 gloo processes, the collectives counted, the gradients compared."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_checkpoint import build_run  # noqa: E402

from multitune.data.batching import collate  # noqa: E402
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample  # noqa: E402
from multitune.distributed.process_group import DistContext  # noqa: E402
from multitune.distributed.strategy import apply_strategy  # noqa: E402
from multitune.training import step as step_module  # noqa: E402

pytestmark = pytest.mark.distributed
WORLD_SIZE = 2
MICRO_BATCHES = 4  # per rank and optimizer step
STRATEGIES = ("fsdp", "ddp")


def examples() -> list[TokenizedExample]:
    """Eight examples of different lengths: rank r trains on the r-th four."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (length, answer) in enumerate([(9, 2), (23, 5), (14, 1), (31, 7)] * 2):
        ids = torch.randint(20, 128, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length - answer) + ids[length - answer :]
        out.append(TokenizedExample(ids, labels, length - answer, 0, i, False))
    return out


def counted_window(model, micro_batches, window_tokens) -> int:
    """Run one accumulation window; the gradient reductions it issued (reduce-scatters and
    all-reduces, the two collectives FSDP2 reduces gradients with)."""
    calls = []
    originals = {name: getattr(dist, name) for name in ("reduce_scatter_single", "all_reduce")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        step_module.accumulate_gradients(model, micro_batches, torch.ones(1), 1, window_tokens)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return len(calls)


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        ctx = DistContext(rank, WORLD_SIZE, rank, WORLD_SIZE, torch.device("cpu"), True)
        everything = examples()
        mine = everything[rank * MICRO_BATCHES : (rank + 1) * MICRO_BATCHES]
        window_tokens = sum(e.num_answer_tokens for e in everything)
        counts, grads = {}, {}
        for strategy in STRATEGIES:
            for layout in ("one", "split", "split_synced_every_time"):
                model, _, _ = build_run()
                apply_strategy(model, strategy, ctx)
                batches = [collate(mine, 0)] if layout == "one" else [collate([e], 0) for e in mine]
                original = step_module.set_gradient_sync
                if layout == "split_synced_every_time":  # what the loop did before
                    step_module.set_gradient_sync = lambda model, enabled: None
                try:
                    counts[f"{strategy}/{layout}"] = counted_window(model, batches, window_tokens)
                finally:
                    step_module.set_gradient_sync = original
                grads[f"{strategy}/{layout}"] = {
                    n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad
                }
        if rank == 0:
            (out / "counts.json").write_text(json.dumps(counts))
            torch.save(grads, out / "grads.pt")
    finally:
        dist.destroy_process_group()


def test_accumulation_reduces_gradients_once_per_optimizer_step(tmp_path):
    mp.spawn(_worker, args=(free_port(), tmp_path), nprocs=WORLD_SIZE)
    counts = json.loads((tmp_path / "counts.json").read_text())
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    for strategy in STRATEGIES:
        once = counts[f"{strategy}/one"]
        assert once > 0, strategy
        # 4 micro-batches per rank cost the reductions of one...
        assert counts[f"{strategy}/split"] == once, (strategy, counts)
        # ...where syncing on every micro-batch costs four times as many.
        assert counts[f"{strategy}/split_synced_every_time"] == MICRO_BATCHES * once, counts
        # The gradient summed locally and reduced once is the one-micro-batch gradient.
        reference = grads[f"{strategy}/one"]
        assert any(g.abs().sum() > 0 for g in reference.values())
        for name, value in reference.items():
            for layout in ("split", "split_synced_every_time"):
                torch.testing.assert_close(
                    grads[f"{strategy}/{layout}"][name], value, rtol=1e-4, atol=1e-7
                )

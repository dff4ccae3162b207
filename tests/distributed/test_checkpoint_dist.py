"""Checkpoints of an FSDP2-sharded LoRA model across 2 gloo processes on CPU."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_checkpoint import LORA_A, build_run, train_steps, trainable  # noqa: E402

from multitune.checkpoint import (  # noqa: E402
    CheckpointError,
    list_committed,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from multitune.checkpoint import checkpointer as checkpointer_module  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
WORLD_SIZE = 2


def build_sharded_run(mesh):
    from torch.distributed.fsdp import fully_shard

    model, _, _ = build_run()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The optimizer must see the sharded (DTensor) parameters, so it is built after sharding.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def full_trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, root: Path, broken_root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model, optimizer, scheduler = build_sharded_run(mesh)
        torch.manual_seed(1)
        train_steps(model, optimizer, scheduler, 1)
        assert model.get_parameter(LORA_A).to_local().shape == (2, 32)  # really sharded

        torch.manual_seed(100 + rank)  # every rank's RNG differs
        path = save_checkpoint(root, 1, model, optimizer, scheduler, {"step": 1})
        expected_draw = torch.rand(3)
        manifest = read_manifest(path)
        assert manifest.world_size == WORLD_SIZE
        assert {"rng-rank0.pt", "rng-rank1.pt"} <= {r.path for r in manifest.files}
        assert verify_checkpoint(path) == []
        if rank == 0:
            torch.save(full_trainable(model), root / "expected_full.pt")
        else:
            full_trainable(model)  # full_tensor is a collective

        fresh, fresh_optimizer, fresh_scheduler = build_sharded_run(mesh)
        load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)
        assert torch.rand(3).equal(expected_draw)  # this rank's own RNG came back
        for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), name
        for p, q in zip(
            optimizer.param_groups[0]["params"], fresh_optimizer.param_groups[0]["params"]
        ):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(
                    optimizer.state[p][key].to_local(), fresh_optimizer.state[q][key].to_local()
                )

        # What the HF Trainer path does under FSDP2: each rank hands over its local slice.
        real = checkpointer_module.get_state_dict

        def local_slices(*args, **kwargs):
            model_state, optim_state = real(*args, **kwargs)
            return {k: v.to_local() for k, v in model_state.items()}, optim_state

        checkpointer_module.get_state_dict = local_slices
        try:
            save_checkpoint(broken_root, 1, model, optimizer, scheduler, {"step": 1})
        except CheckpointError as error:
            assert "the model's is [4, 32]" in str(error), error
        else:
            raise AssertionError("a checkpoint of local slices was committed")
        finally:
            checkpointer_module.get_state_dict = real
        assert list_committed(broken_root) == []
    finally:
        dist.destroy_process_group()


def test_fsdp2_checkpoint_commits_whole_tensors_and_reshards_to_one_process(tmp_path, caplog):
    root, broken_root = tmp_path / "ckpt", tmp_path / "broken"
    mp.spawn(_worker, args=(free_port(), root, broken_root), nprocs=WORLD_SIZE)

    # Resume the 2-rank checkpoint in one unsharded process: DCP reshards, rank 0's RNG returns.
    (path,) = list_committed(root)
    model, optimizer, scheduler = build_run()
    with caplog.at_level(logging.WARNING, logger="multitune.checkpoint"):
        assert load_checkpoint(path, model, optimizer, scheduler) == {"step": 1}
    assert any("saved by 2 ranks, resuming with 1" in r.getMessage() for r in caplog.records)
    expected = torch.load(root / "expected_full.pt", weights_only=True)
    restored = trainable(model)
    assert expected.keys() == restored.keys()
    for name, value in expected.items():
        assert torch.equal(value, restored[name]), name

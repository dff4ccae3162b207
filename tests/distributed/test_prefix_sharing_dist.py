"""Shared prompt prefixes under 2-process FSDP (gloo, CPU) train as one process without them.

Run shape: 3 tasks of 10 rows, 25 training examples, global batch 8 of micro-batches of 2
per process, so each of 2 ranks' micro-batches lays out a task's prefix once for up to two of
its examples. LoRA dropout 0.
"""

from __future__ import annotations

import pytest
from tests.conftest import free_port
from tests.distributed.test_training_dist import (
    adapter,
    run_config,
    start,
    torchrun_argv,
    train_losses,
    wait,
    write_config,
)

from multitune.config import validate_config

pytestmark = pytest.mark.distributed


def sharing_config(output_dir, share_prefix) -> dict:
    data = run_config(output_dir, epochs=1, micro_batch_size=2, global_batch_size=8)
    data["data"]["share_prefix"] = share_prefix
    return data


def test_fsdp_with_shared_prefixes_matches_one_process_without(tmp_path):
    from multitune.recipes import sft

    unshared = tmp_path / "unshared"
    sft.run(validate_config(sharing_config(unshared, False)))

    shared = tmp_path / "shared"
    config = write_config(sharing_config(shared, True), tmp_path / "config.yaml")
    log = tmp_path / "torchrun.log"
    argv = torchrun_argv(config, 2, port=free_port()) + ["distributed.strategy=fsdp"]
    output = wait([start(argv, log)], log)
    assert "shared prefixes computed once per micro-batch: banking77" in output

    reference, losses = train_losses(unshared), train_losses(shared)
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    trained, expected = adapter(shared), adapter(unshared)
    worst = max((trained[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-5, worst
    assert max(t.abs().max().item() for n, t in trained.items() if "lora_B" in n) > 1e-3

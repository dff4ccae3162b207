"""The arithmetic of data parallelism: global batch, accumulation per process, rank shares,
and the strategy rule. The real multi-process runs are in tests/distributed/."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import small_config_dict

from multitune.config import ConfigError, validate_config
from multitune.config.schema import TrainConfig
from multitune.distributed.batches import rank_micro_batches, rank_share
from multitune.distributed.process_group import DistContext, launched_by_torchrun, one_process_or
from multitune.distributed.strategy import choose_strategy
from multitune.training.state import plan_batches


@pytest.mark.parametrize(("world", "accum"), [(1, 12), (2, 6), (3, 4), (12, 1)])
def test_global_batch_is_fixed_and_accumulation_adapts_to_the_world_size(world, accum):
    plan = plan_batches(TrainConfig(micro_batch_size=2, global_batch_size=24), 100, world)
    assert (plan.global_batch, plan.grad_accum, plan.world_size) == (24, accum, world)
    assert (plan.steps_per_epoch, plan.total_steps) == (5, 10)  # the same at every world size


def test_without_global_batch_size_the_one_process_batch_is_the_global_batch():
    plan = plan_batches(TrainConfig(micro_batch_size=4, grad_accum=4), 64, 2)
    assert (plan.global_batch, plan.grad_accum) == (16, 2)
    assert "global batch 16 (micro 4 x accum 2 x 2 processes)" in plan.describe()


def test_global_batch_that_does_not_divide_names_the_keys():
    with pytest.raises(ValueError) as error:
        plan_batches(TrainConfig(micro_batch_size=8, global_batch_size=48), 100, 12)
    message = str(error.value)
    assert "train.global_batch_size (48)" in message
    assert "train.micro_batch_size (8) x 12 processes = 96" in message


def test_global_batch_size_and_grad_accum_together_are_an_error(tmp_path):
    data = small_config_dict(tmp_path)
    data["train"].update(global_batch_size=32, grad_accum=2)
    with pytest.raises(ConfigError, match="set train.global_batch_size or train.grad_accum"):
        validate_config(data)


def test_rank_shares_partition_every_global_batch():
    for size in (8, 5, 1):
        chosen = list(range(size))
        shares = [list(rank_share(chosen, rank, 4)) for rank in range(4)]
        assert sum(shares, []) == chosen


def collate(rows):
    ids = torch.tensor([[r, r + 1, r + 2] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def test_every_rank_runs_as_many_micro_batches_and_fillers_carry_no_labels():
    chosen = [10, 11, 12]  # a short last batch over 4 ranks, micro-batch 2
    batches = [rank_micro_batches(chosen, DistContext(r, 4), 2, collate) for r in range(4)]
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    assert [b[0]["input_ids"][:, 0].tolist() for b in batches[:3]] == [[10], [11], [12]]
    filler = batches[3][0]
    assert filler["input_ids"][0, 0] == 10 and (filler["labels"] == -100).all()


def test_one_process_gets_the_whole_batch_in_micro_batches():
    batches = rank_micro_batches(list(range(5)), DistContext(), 2, collate)
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]


def test_auto_replicates_on_cpu_and_explicit_strategies_are_kept():
    one_node = DistContext(0, 2, 0, 2)
    two_nodes = DistContext(0, 4, 0, 2)
    assert choose_strategy("auto", 10**9, one_node)[0] == "ddp"
    assert choose_strategy("auto", 10**9, two_nodes)[0] == "hsdp"
    assert choose_strategy("fsdp", 10**9, one_node) == ("fsdp", "set by distributed.strategy")


def test_runpods_world_size_alone_is_not_a_torchrun_launch():
    assert not launched_by_torchrun({"WORLD_SIZE": "12", "NODE_RANK": "0"})
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert launched_by_torchrun(torchrun)


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-process gloo group, as torchrun would leave it (destroyed afterwards)."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_train_loop_without_a_context_under_a_process_group_is_an_error(gloo_group, small_config):
    # Without the context the loop would divide by the tokens of world size 1 while the strategy
    # sums every rank's gradient: refused before anything runs.
    from multitune.recipes import dpo
    from multitune.training import loop

    with pytest.raises(RuntimeError, match="no DistContext was given"):
        loop.train_loop(None, None, [], small_config, small_config.output_dir, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no DistContext was given"):
        dpo.compute_reference_logprobs(None, [], pad_id=0, batch_size=1)


def test_a_missing_context_without_a_process_group_is_one_process():
    ctx = one_process_or(None)
    assert (ctx.rank, ctx.world_size, ctx.initialized) == (0, 1, False)
    given = DistContext(rank=1, world_size=2, initialized=True)
    assert one_process_or(given) is given

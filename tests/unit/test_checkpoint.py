"""Checkpoint save / commit / verify / resume on a real tiny Llama with LoRA adapters."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from multitune.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_trainable_tensors,
    config_hash,
    find_resume_checkpoint,
    list_committed,
    list_temporary,
    load_checkpoint,
    read_manifest,
    restore_rng_state,
    save_checkpoint,
    start_checkpoint,
    verify_checkpoint,
)
from multitune.checkpoint import checkpointer as checkpointer_module
from multitune.checkpoint.manifest import build_manifest, write_manifest

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"  # raised inside peft
)

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def build_run(seed: int = 0, rank: int = 4):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, num_steps: int) -> None:
    for _ in range(num_steps):
        input_ids = torch.randint(0, 128, (2, 8))
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained 2 steps and saved at step 2 (shared: tests copy the folder to modify it)."""
    root = tmp_path_factory.mktemp("shared") / "checkpoints"
    model, optimizer, scheduler = build_run()
    train_steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(
        root, 2, model, optimizer, scheduler, {"step": 2, "epoch": 0}, config_hash="abc"
    )
    return path, model


def save_run(root: Path, steps: list[int], keep_last: int = 5):
    model, optimizer, scheduler = build_run()
    train_steps(model, optimizer, scheduler, 1)
    for step in steps:
        save_checkpoint(root, step, model, optimizer, scheduler, {"step": step}, keep_last)
    return model, optimizer, scheduler


def test_resume_restores_adapters_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = build_run()
    train_steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(
        tmp_path, 2, model, optimizer, scheduler, {"step": 2, "epoch": 0, "run_id": "r1"}
    )
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3))

    fresh_model, fresh_optimizer, fresh_scheduler = build_run()
    torch.manual_seed(123)  # move every generator somewhere else
    assert not torch.equal(trainable(fresh_model)[LORA_A], trainable(model)[LORA_A])
    train_state = load_checkpoint(path, fresh_model, fresh_optimizer, fresh_scheduler)

    assert train_state == {"step": 2, "epoch": 0, "run_id": "r1"}
    assert torch.rand(4).equal(expected_draws[0])
    assert random.random() == expected_draws[1]
    assert np.array_equal(np.random.rand(3), expected_draws[2])
    original, restored = trainable(model), trainable(fresh_model)
    assert original.keys() == restored.keys() and len(original) == 8
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    for p, q in zip(optimizer.param_groups[0]["params"], fresh_optimizer.param_groups[0]["params"]):
        assert set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, fresh_optimizer.state[q][key]), key
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr() == [pytest.approx(1e-2 / 3)]
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2

    # One more step from both: the resumed run continues exactly like the uninterrupted one.
    torch.manual_seed(7)
    train_steps(model, optimizer, scheduler, 1)
    torch.manual_seed(7)
    train_steps(fresh_model, fresh_optimizer, fresh_scheduler, 1)
    for name, value in trainable(model).items():
        assert torch.equal(value, trainable(fresh_model)[name]), name


def test_committed_folder_holds_manifest_of_every_file(trained):
    path, _ = trained
    assert path.name == "step-00000002"
    manifest = read_manifest(path)
    files = {record.path for record in manifest.files}
    assert {"dcp/.metadata", "rng-rank0.pt", "scheduler.pt", "train_state.json"} <= files
    assert any(f.startswith("dcp/__0_") and f.endswith(".distcp") for f in files)
    assert (manifest.step, manifest.world_size, manifest.config_hash) == (2, 1, "abc")
    assert all(len(record.sha256) == 64 and record.size > 0 for record in manifest.files)
    assert json.loads((path / "train_state.json").read_text()) == {"epoch": 0, "step": 2}
    assert verify_checkpoint(path) == []
    assert list_temporary(path.parent) == []


def test_async_save_writes_the_state_of_its_step_while_training_goes_on(tmp_path):
    model, optimizer, scheduler = build_run()
    train_steps(model, optimizer, scheduler, 2)
    at_save = trainable(model)
    moments = [optimizer.state[p]["exp_avg"].clone() for p in optimizer.param_groups[0]["params"]]
    pending = start_checkpoint(
        tmp_path, 2, model, optimizer, scheduler, {"step": 2}, write_async=True
    )
    assert pending.written is not None  # a background write, not yet committed
    assert list_committed(tmp_path) == []
    train_steps(model, optimizer, scheduler, 2)  # in-place updates while it may still write
    assert not torch.equal(trainable(model)[LORA_A], at_save[LORA_A])
    path = pending.commit()
    assert verify_checkpoint(path) == []

    fresh, fresh_optimizer, fresh_scheduler = build_run(seed=1)
    assert load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler) == {"step": 2}
    restored = trainable(fresh)
    assert all(torch.equal(restored[name], value) for name, value in at_save.items())
    for p, expected in zip(fresh_optimizer.param_groups[0]["params"], moments):
        assert torch.equal(fresh_optimizer.state[p]["exp_avg"], expected)


def test_failed_async_write_fails_the_commit_and_commits_nothing(tmp_path, monkeypatch):
    model, optimizer, scheduler = save_run(tmp_path, [1])

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer_module.FileSystemWriter, "write_data", full_disk)
    pending = start_checkpoint(
        tmp_path, 2, model, optimizer, scheduler, {"step": 2}, write_async=True
    )
    with pytest.raises(CheckpointError, match="asynchronous write into .* failed") as error:
        pending.commit()
    assert "No space left on device" in str(error.value)
    assert list_committed(tmp_path) == [tmp_path / "step-00000001"]


def test_killed_before_commit_leaves_tmp_that_resume_ignores_and_next_save_purges(
    tmp_path, monkeypatch
):
    model, optimizer, scheduler = save_run(tmp_path, [1])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the shards, before the rename

    monkeypatch.setattr(checkpointer_module, "commit_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"step": 2})
    monkeypatch.undo()
    (partial,) = list_temporary(tmp_path)
    assert partial.name.startswith("step-00000002.tmp-")
    assert (partial / "dcp" / ".metadata").is_file()

    assert list_committed(tmp_path) == [tmp_path / "step-00000001"]
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-00000001"
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"step": 3})
    assert list_temporary(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_newest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog, damage):
    save_run(tmp_path, [1, 2])
    newest = tmp_path / "step-00000002"
    (shard,) = (newest / "dcp").glob("*.distcp")
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    with caplog.at_level(logging.WARNING, logger="multitune.checkpoint"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "step-00000001"
    problem = "size mismatch" if damage == "truncate" else "sha256 mismatch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000002" in m and problem in m and shard.name in m for m in warnings)


def test_resume_raises_when_no_committed_checkpoint_verifies(tmp_path):
    assert find_resume_checkpoint(tmp_path / "absent") is None
    save_run(tmp_path, [1])
    (tmp_path / "step-00000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        find_resume_checkpoint(tmp_path)


def test_keep_last_two_after_five_saves_leaves_the_newest_two(tmp_path):
    save_run(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    assert [p.name for p in list_committed(tmp_path)] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_keep_last_zero_is_rejected_before_writing(tmp_path):
    model, optimizer, scheduler = build_run()
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, scheduler, {}, keep_last=0)
    assert not (tmp_path / "ckpt").exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler = save_run(tmp_path, [1])
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1, "again": True})
    assert list_committed(tmp_path) == [tmp_path / "step-00000001"]
    assert json.loads((tmp_path / "step-00000001" / "train_state.json").read_text())["again"]
    assert list_temporary(tmp_path) == []


def test_train_state_must_be_json(tmp_path):
    model, optimizer, scheduler = build_run()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"when": object()})
    assert not any(tmp_path.iterdir())


def _slice_lora_a(state):
    """What a broken sharded save writes: one rank's half of a LoRA weight."""
    model_state, optim_state = state
    model_state[LORA_A] = model_state[LORA_A][:2].clone()
    return model_state, optim_state


def _perturb_lora_a(state):
    model_state, optim_state = state
    model_state[LORA_A] = model_state[LORA_A] + 1.0
    return model_state, optim_state


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_slice_lora_a, r"shape \[2, 32\], the model's is \[4, 32\]"), (_perturb_lora_a, "differ")],
)
def test_save_refuses_to_commit_tensors_that_are_not_the_models(
    tmp_path, monkeypatch, corrupt, message
):
    model, optimizer, scheduler = build_run()
    train_steps(model, optimizer, scheduler, 1)
    real = checkpointer_module.get_state_dict
    monkeypatch.setattr(
        checkpointer_module, "get_state_dict", lambda *a, **k: corrupt(real(*a, **k))
    )
    with pytest.raises(CheckpointError, match="not committed") as raised:
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1})
    assert LORA_A in str(raised.value)
    assert re.search(message, str(raised.value))
    assert list_committed(tmp_path) == []


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_tampered_tensor_shape_fails_verification_and_load(trained, tmp_path):
    source, model = trained
    path = tmp_path / source.name
    shutil.copytree(source, path)
    shutil.rmtree(path / "dcp")
    options = StateDictOptions(ignore_frozen_params=True)
    state = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}
    state[LORA_A] = state[LORA_A][:, :16].clone()
    dcp.save({"model": state}, checkpoint_id=path / "dcp", no_dist=True)

    assert any("dcp/" in problem for problem in verify_checkpoint(path))
    write_manifest(path, build_manifest(path, 2, 1, "abc"))  # now only the shape is wrong
    assert verify_checkpoint(path) == []
    problems = check_trainable_tensors(path, model)
    assert problems == [f"{LORA_A}: saved with shape [4, 16], the model's is [4, 32]"]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(path, *build_run())


def test_load_into_model_with_other_lora_rank_names_every_mismatch(trained):
    path, _ = trained
    with pytest.raises(CheckpointError, match="does not fit this model") as raised:
        load_checkpoint(path, *build_run(rank=8))
    assert str(raised.value).count("the model's is [8, 32]") == 4


def test_load_without_this_ranks_rng_file_warns_and_keeps_rng(trained, tmp_path, caplog):
    source, _ = trained
    path = tmp_path / source.name
    shutil.copytree(source, path)
    (path / "rng-rank0.pt").unlink()
    fresh = build_run()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="multitune.checkpoint"):
        load_checkpoint(path, *fresh, verify=False)
    assert torch.rand(3).equal(expected)
    assert any("rng-rank0.pt" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="missing file rng-rank0.pt"):
        load_checkpoint(path, *build_run())


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    state = capture_rng_state()
    draws = (random.random(), np.random.rand(2), torch.rand(2))
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert random.random() == draws[0]
    assert np.array_equal(np.random.rand(2), draws[1])
    assert torch.rand(2).equal(draws[2])


def test_config_hash_ignores_key_order_and_sees_values():
    a = {"model": {"name": "tiny", "lora": {"r": 4}}, "lr": 1e-4, "out": Path("runs/a")}
    b = {"lr": 1e-4, "out": "runs/a", "model": {"lora": {"r": 4}, "name": "tiny"}}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64
    assert config_hash(a) != config_hash({**b, "lr": 2e-4})
    with pytest.raises(TypeError, match="model_dump"):
        config_hash({"tags": {"a", "b"}})

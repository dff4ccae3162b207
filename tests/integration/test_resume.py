"""Checkpoint and resume through the real CLI: a killed or signalled run, relaunched, ends with
exactly the adapter of an uninterrupted run.

Run shape: 3 tasks of 10 examples, 25 of them for training, micro batch 7, so an epoch is 4
optimizer steps (the last one 4 examples) and 2 epochs are 8 steps. LoRA dropout is on, so
the restored RNG state matters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import REPO, small_config_dict

from multitune.checkpoint import CheckpointError, list_committed
from multitune.config import validate_config

TOTAL_STEPS = 8
STEPS_PER_EPOCH = 4


def run_config(output_dir: Path) -> dict:
    data = small_config_dict(output_dir, max_examples=10)
    data["lora"]["dropout"] = 0.1
    data["train"].update({"epochs": 2, "micro_batch_size": 7, "log_every_steps": 1})
    data["eval"].update({"before_training": False, "max_examples": 4})
    return data


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def launch(config: dict, tmp_path: Path, *overrides: str) -> subprocess.Popen:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [sys.executable, "-m", "multitune", "train", str(path), *overrides],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before {what}:\n{finish(proc)[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def checkpoint_of(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:08d}"


def train_steps_logged(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run A: the whole run in this process, no interruption; its config and adapter."""
    from multitune.recipes import sft

    data = run_config(tmp_path_factory.mktemp("uninterrupted") / "run")
    sft.run(validate_config(data))
    return data, adapter_tensors(Path(data["output_dir"]))


def assert_same_adapter(output_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    resumed = adapter_tensors(output_dir)
    assert resumed.keys() == reference.keys()
    differing = [name for name in reference if not torch.equal(resumed[name], reference[name])]
    assert not differing, f"{len(differing)} adapter tensors differ, e.g. {differing[:3]}"


def test_resume_after_kills_matches_uninterrupted_run(tmp_path, uninterrupted):
    _, reference = uninterrupted
    out = tmp_path / "run"
    data = run_config(out)
    # Every step saved and none purged, so each relaunch can start from exactly step k.
    data["checkpoint"] = {"every_steps": 1, "keep_last": 100}
    resume_from = "auto"
    # First step; end of epoch 0 (the next step starts epoch 1); mid-epoch 1.
    for kill_after in (1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2):
        proc = launch(data, tmp_path, f"resume={resume_from}")
        target = checkpoint_of(out, kill_after)
        wait_for(proc, target.is_dir, f"checkpoint {target.name}")
        proc.kill()
        proc.wait()
        resume_from = str(target)
        # The train state points at the next example to train on: the epoch boundary moves on.
        state = json.loads((target / "train_state.json").read_text())
        epoch, position = divmod(kill_after, STEPS_PER_EPOCH)
        assert (state["step"], state["epoch"]) == (kill_after, epoch)
        assert state["epoch_position"] == (7 * position if position else 0)

    code, output = finish(launch(data, tmp_path, f"resume={resume_from}"))
    assert code == 0, output[-3000:]
    assert f"resumed from step {STEPS_PER_EPOCH + 2} " in output
    assert train_steps_logged(out)[-2:] == [TOTAL_STEPS - 1, TOTAL_STEPS]
    assert_same_adapter(out, reference)


def test_sigterm_saves_exits_zero_and_relaunch_resumes(tmp_path, uninterrupted):
    _, reference = uninterrupted
    out = tmp_path / "run"
    data = run_config(out)  # no periodic checkpoints: only the signal makes one
    proc = launch(data, tmp_path)
    wait_for(proc, lambda: train_steps_logged(out), "the first training step")
    proc.send_signal(signal.SIGTERM)
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1, saved
    stopped_at = json.loads((saved[0] / "train_state.json").read_text())["step"]
    assert f"SIGTERM received: stopped at step {stopped_at}" in output
    assert 1 <= stopped_at <= TOTAL_STEPS
    assert not (out / "eval_results.json").exists()

    code, output = finish(launch(data, tmp_path))
    assert code == 0, output[-3000:]
    assert f"resumed from step {stopped_at} " in output
    assert (out / "eval_results.json").is_file()
    assert train_steps_logged(out)[-1] == TOTAL_STEPS
    assert_same_adapter(out, reference)


def test_resume_of_a_finished_run_goes_straight_to_evaluation(uninterrupted, caplog):
    from multitune.recipes import sft

    data, _ = uninterrupted
    out = Path(data["output_dir"])
    (out / "eval_results.json").unlink()
    logged = train_steps_logged(out)
    with caplog.at_level("INFO", logger="multitune.training.loop"):
        results = sft.run(validate_config(data))
    assert f"resumed from step {TOTAL_STEPS} " in caplog.text
    assert train_steps_logged(out) == logged  # not one step more
    assert results["tasks"] and (out / "eval_results.json").is_file()


def test_resume_with_changed_lora_rank_is_an_error_naming_the_key(uninterrupted):
    from multitune.recipes import sft

    data, _ = uninterrupted
    changed = {**data, "lora": {**data["lora"], "r": 4}}
    with pytest.raises(CheckpointError, match=r"config changed.*\(lora\.r\)"):
        sft.run(validate_config(changed))
    # Keys that only say how long the run goes may change.
    longer = {**data, "train": {**data["train"], "max_steps": TOTAL_STEPS, "epochs": 3}}
    assert sft.choose_resume_checkpoint(validate_config(longer), Path(data["output_dir"]))
    # So may sharing prompt prefixes, which changes the layout but not the loss.
    unshared = {**data, "data": {**data["data"], "share_prefix": False}}
    assert sft.choose_resume_checkpoint(validate_config(unshared), Path(data["output_dir"]))


def test_failed_async_checkpoint_write_fails_the_run(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    from multitune.recipes import sft

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    out = tmp_path / "run"
    data = run_config(out)
    data["checkpoint"] = {"every_steps": 1, "async_save": True}
    data["train"]["max_steps"] = 3
    # The write of step 1 runs in the background; its commit, at the next save, fails the run.
    with pytest.raises(
        CheckpointError, match=r"(?s)step 1 not written.*asynchronous write.*No space left"
    ):
        sft.run(validate_config(data))
    assert train_steps_logged(out) == [1, 2]
    assert list_committed(out / "checkpoints") == []
    assert not (out / "adapter").exists()


def test_trained_tied_embedding_resumes_exactly(tmp_path):
    # configs/demo.yaml trains embed_tokens (lora.modules_to_save), which the tiny model ties to
    # lm_head: one trainable Parameter under two names, saved under both.
    from multitune.recipes import sft

    def config(out: Path) -> dict:
        data = run_config(out)
        data["lora"]["modules_to_save"] = ["embed_tokens"]
        data["train"]["max_steps"] = 5
        data["checkpoint"] = {"every_steps": 1, "keep_last": 10}
        return data

    whole = tmp_path / "whole"
    sft.run(validate_config(config(whole)))
    resumed = tmp_path / "resumed"
    # Step 3 is mid-epoch 0 (4 steps an epoch); the resumed run crosses into epoch 1.
    shutil.copytree(checkpoint_of(whole, 3), checkpoint_of(resumed, 3))
    sft.run(validate_config(config(resumed)))
    assert train_steps_logged(resumed) == [4, 5]
    expected = adapter_tensors(whole)
    assert any("embed_tokens" in name for name in expected)
    assert_same_adapter(resumed, expected)

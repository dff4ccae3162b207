"""A real W&B run in offline mode: the run files hold the config, the metrics the loop logged,
the predictions table and the confusion images; a resumed run continues the same run id."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from multitune import cli
from multitune.config import validate_config
from multitune.evaluation.runner import NUM_SAMPLES
from multitune.tracking.tracker import TrackingError, check_tracking_credentials, wandb_record

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from conftest import small_config_dict  # noqa: E402

BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf Records in 32 KiB blocks


def wandb_records(path: Path) -> list:
    """Every Record in a .wandb transaction log, decoded with wandb's own protobuf schema."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        if pos + length > len(data):  # a record still being written
            break
        chunks += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def complete_records(log_file: Path, timeout_s: float = 60.0) -> list:
    """The records of a finished run. wandb-core's writer may still be flushing the file when
    ``run.finish()`` has returned (seen once in CI: a second run's file held no records yet), so
    wait for the run's closing ``exit`` record, and say what was there if it never comes."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(log_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            return records
        if time.monotonic() > deadline:
            size = log_file.stat().st_size
            raise AssertionError(f"{log_file} ({size} bytes) has no exit record: {kinds}")
        time.sleep(0.2)


def read_offline_run(run_dir: Path) -> dict:
    (log_file,) = run_dir.glob("run-*.wandb")
    out = {"id": None, "config": {}, "history": []}
    for record in complete_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update(
                {i.key: json.loads(i.value_json) for i in record.run.config.update}
            )
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return out


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def write_config(tmp_path: Path, max_steps: int) -> Path:
    config = small_config_dict(tmp_path / "run", max_examples=16)
    config["train"].update({"max_steps": max_steps, "log_every_steps": 1, "warmup_ratio": 0.0})
    config["eval"].update({"max_examples": 4, "before_training": False})
    config["tracking"] = {
        "backends": ["jsonl", "wandb"],
        "wandb": {"project": "multitune-test", "mode": "offline", "tags": ["ci"]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "wandb-root"
    root.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return root


def test_offline_wandb_run_holds_config_metrics_table_and_resumes_same_id(tmp_path, wandb_env):
    assert cli.main(["train", str(write_config(tmp_path, max_steps=2))]) == 0
    out = tmp_path / "run"
    (first_dir,) = offline_runs(wandb_env)
    first = read_offline_run(first_dir)

    # The resolved config, as the run saved it.
    assert first["config"]["train"]["max_steps"] == 2
    assert first["config"]["tracking"]["wandb"]["project"] == "multitune-test"
    assert [t["name"] for t in first["config"]["tasks"]] == [
        "banking77",
        "commonsense_qa",
        "text_claims",
    ]

    # Per-step train figures equal the metrics.jsonl records of the same step.
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in jsonl if r["split"] == "train"}
    logged = {h["step"]: h for h in first["history"] if "train/loss" in h}
    assert sorted(logged) == sorted(train_rows) == [1, 2]
    for step, row in train_rows.items():
        assert logged[step]["train/loss"] == pytest.approx(row["loss"])
        assert logged[step]["train/lr"] == pytest.approx(row["lr"])
        assert logged[step]["train/grad_norm"] == pytest.approx(row["grad_norm"])
        assert logged[step]["train/tokens_per_s"] > 0
        assert logged[step]["train/peak_memory_gb"] == pytest.approx(row["peak_memory_gb"])
        assert 0.01 < row["peak_memory_gb"] < 64
        task_keys = {k for k in logged[step] if k.startswith("train/task/")}
        assert task_keys == {k for k in (f"train/{k}" for k in row) if "/task/" in k}
        assert task_keys  # per-task loss is there
    assert any("validation/task/banking77/loss" in h for h in first["history"])

    # Final evaluation: per-task metrics, confusion images and the predictions table.
    results = json.loads((out / "eval_results.json").read_text())
    (evaluation,) = [h for h in first["history"] if "eval/banking77/accuracy" in h]
    assert evaluation["step"] == 2
    for task, values in results["tasks"].items():
        assert evaluation[f"eval/{task}/accuracy"] == pytest.approx(values["accuracy"])
    assert evaluation["eval/banking77/confusion/_type"] == "image-file"
    assert evaluation["eval/predictions/_type"] == "table-file"
    table = json.loads((first_dir / "files" / evaluation["eval/predictions/path"]).read_text())
    assert table["columns"] == ["task", "prompt", "prediction", "gold"]
    expected = [
        [task, s["prompt"], s["prediction"], s["gold"]]
        for task, values in results["tasks"].items()
        for s in values["samples"]
    ]
    assert table["data"] == expected
    assert len(expected) == sum(min(v["n"], NUM_SAMPLES) for v in results["tasks"].values())

    # Plots of the run (tracking/plots.py) sit beside it.
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"loss.png", "loss_banking77.png", "confusion_banking77.png"} <= plots

    # The checkpoint carries the run id; running longer resumes it and continues the same run.
    (checkpoint,) = sorted((out / "checkpoints").glob("step-*"))
    assert (
        json.loads((checkpoint / "train_state.json").read_text())["tracker_run_id"] == first["id"]
    )
    assert cli.main(["train", str(write_config(tmp_path, max_steps=3))]) == 0
    second_dir = [d for d in offline_runs(wandb_env) if d != first_dir]
    (second_dir,) = second_dir
    second = read_offline_run(second_dir)
    assert second["id"] == first["id"]
    assert [h["step"] for h in second["history"] if "train/loss" in h] == [3]


def test_wandb_online_without_api_key_fails_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    config = small_config_dict(tmp_path / "run")
    config["tracking"] = {"backends": ["jsonl", "wandb"], "wandb": {"mode": "online"}}
    cfg = validate_config(config)
    with pytest.raises(TrackingError, match="WANDB_API_KEY is not set.*export WANDB_API_KEY"):
        check_tracking_credentials(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_tracking_credentials(cfg)  # now fine

    # Through the CLI: the error comes before any data or model work (no data_report.json).
    monkeypatch.delenv("WANDB_API_KEY")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(path)]) == 2
    assert not (tmp_path / "run" / "data_report.json").exists()


def test_wandb_record_namespaces_keys_by_split():
    record = {"step": 3, "epoch": 0.5, "split": "validation", "loss": 1.5, "task/a/loss": 2.0}
    assert wandb_record(record) == {
        "step": 3,
        "epoch": 0.5,
        "validation/loss": 1.5,
        "validation/task/a/loss": 2.0,
    }

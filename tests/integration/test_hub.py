"""Hub publishing against a local HTTP server standing in for the Hub (HF_ENDPOINT).

The fake (tests/fake_hub.py) speaks the Hub's HTTP API for the calls huggingface_hub makes, so
the real client code runs end to end: a training run pushes its adapter and card and mirrors its
checkpoints; a fresh output dir resumes from the mirrored checkpoint; every error path prints
its fix. Nothing here reaches the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from tests.conftest import small_config_dict
from tests.fake_hub import FakeHub

from multitune import cli
from multitune.config import dump_config, validate_config
from multitune.hub.checks import (
    HubError,
    check_write_access,
    require_token,
)
from multitune.hub.push import CHECKPOINT_BRANCH, push_run


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    url = fake.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    # conftest sets HF_HUB_OFFLINE=1, which huggingface_hub reads once at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield fake
    fake.stop()


def fake_run_dir(root: Path) -> Path:
    """The files `multitune train` leaves, with placeholder weights (this is about transport)."""
    out = root / "run"
    (out / "adapter").mkdir(parents=True)
    cfg = validate_config(small_config_dict(out))
    (out / "config.yaml").write_text(dump_config(cfg))
    (out / "eval_results.json").write_text(
        json.dumps({"tasks": {"banking77": {"n": 3, "loss": 0.5, "accuracy": 1.0}}})
    )
    (out / "data_report.json").write_text("{}")
    (out / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights\x01" * 10)
    (out / "adapter" / "tokenizer.json").write_text("{}")
    return out


def test_push_uploads_adapter_tokenizer_config_results_and_card(tmp_path, hub):
    out = fake_run_dir(tmp_path)
    url = push_run(out, "alice/tiny", private=True)
    assert url.endswith("/alice/tiny")
    files = hub.files("alice/tiny")
    assert set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "config.yaml",
        "eval_results.json",
        "data_report.json",
        "README.md",
    }
    assert (
        files["adapter_model.safetensors"]
        == (out / "adapter/adapter_model.safetensors").read_bytes()
    )
    assert files["config.yaml"] == (out / "config.yaml").read_bytes()
    assert hub.repos["alice/tiny"]["private"] is True
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert 'PeftModel.from_pretrained(base, "alice/tiny")' in card


@pytest.mark.parametrize(
    ("setup", "repo", "message"),
    [
        (
            "no_token",
            "alice/x",
            r"HF_TOKEN is not set\. Create a 'write' token at .*settings/tokens",
        ),
        ("bad_token", "alice/x", r"rejected HF_TOKEN \(401, invalid or expired token\)"),
        ("read_token", "alice/x", r"read-only token; pushing to alice/x needs a 'write'"),
        ("no_write", "bob/shared", r"no write access to bob/shared \(403\)"),
        ("missing", "carol/x", r"hub.repo carol/x does not exist .* cannot create it in 'carol'"),
    ],
)
def test_push_errors_name_the_fix(tmp_path, hub, monkeypatch, capsys, setup, repo, message):
    out = fake_run_dir(tmp_path)
    hub.repos["bob/shared"] = {"private": False, "branches": {"main": {}}, "commits": 0}
    hub.read_only.add("bob/shared")
    tokens = {"no_token": None, "bad_token": "hf_nope", "read_token": "hf_read"}
    if setup in tokens:
        if tokens[setup] is None:
            monkeypatch.delenv("HF_TOKEN")
        else:
            monkeypatch.setenv("HF_TOKEN", tokens[setup])
    assert cli.main(["push", str(out), "--repo", repo]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not any(method == "POST" for method, _ in hub.requests), "nothing may be uploaded"


def test_missing_repo_in_own_namespace_is_created(tmp_path, hub):
    assert check_write_access("team/new", "hf_write") is False  # will be created
    assert cli.main(["push", str(fake_run_dir(tmp_path)), "--repo", "team/new", "--private"]) == 0
    assert "README.md" in hub.files("team/new")


def test_offline_and_unreachable_hub_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set; unset it"):
        check_write_access("alice/x", "hf_write")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9"):
        check_write_access("alice/x", "hf_write")


def test_training_with_push_checkpoints_is_checked_before_loading_anything(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no stored login either
    config = small_config_dict(tmp_path / "run")
    config["hub"] = {"push_checkpoints": True, "repo": "alice/x"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(path)]) == 2
    assert "pushing to alice/x needs HF_TOKEN with write access" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data_report.json").exists()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["train", str(path)]) == 2
    assert "need the Hub, but HF_HUB_OFFLINE=1 is set" in capsys.readouterr().err
    with pytest.raises(Exception, match="need hub.repo"):
        validate_config({**config, "hub": {"push": True}})


def test_require_token_reads_hf_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert require_token() == "hf_abc"


def train_config(tmp_path: Path, out: Path, max_steps: int) -> Path:
    config = small_config_dict(out, max_examples=16)
    config["train"].update({"max_steps": max_steps, "warmup_ratio": 0.0, "log_every_steps": 1})
    config["eval"].update({"max_examples": 4, "before_training": False})
    config["checkpoint"] = {"every_steps": 1, "keep_last": 1}
    config["hub"] = {"push": True, "repo": "alice/run", "push_checkpoints": True}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_training_pushes_model_and_checkpoints_and_a_fresh_dir_resumes_from_the_hub(tmp_path, hub):
    first = tmp_path / "pod1"
    assert cli.main(["train", str(train_config(tmp_path, first, max_steps=2))]) == 0
    main_files = hub.files("alice/run")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "config.yaml"} <= set(
        main_files
    )
    assert main_files["eval_results.json"] == (first / "eval_results.json").read_bytes()
    assert (first / "README.md").read_text().startswith("---\n")  # the card is also local
    # The branch mirrors OUTPUT_DIR/checkpoints: keep_last=1 leaves only step 2.
    mirrored = hub.files("alice/run", CHECKPOINT_BRANCH)
    steps = {name.split("/")[1] for name in mirrored}
    assert steps == {"step-00000002"}
    local = first / "checkpoints" / "step-00000002"
    assert (
        mirrored["checkpoints/step-00000002/train_state.json"]
        == (local / "train_state.json").read_bytes()
    )

    # A fresh machine: same config, empty output dir, two more steps.
    second = tmp_path / "pod2"
    assert cli.main(["train", str(train_config(tmp_path, second, max_steps=3))]) == 0
    records = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3]  # resumed at step 2
    assert (second / "checkpoints" / "step-00000003").is_dir()
    assert {n.split("/")[1] for n in hub.files("alice/run", CHECKPOINT_BRANCH)} == {"step-00000003"}

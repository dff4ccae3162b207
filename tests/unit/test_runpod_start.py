"""scripts/runpod/start.sh (the image's entrypoint): caches on the volume, runpod's cluster
variables into the torchrun command, secrets checked from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

START = REPO / "scripts" / "runpod" / "start.sh"


def run_start(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    for key in ("HF_HOME", "WANDB_DIR", "MULTITUNE_EXTENSION_DIR", "PRIMARY_ADDR", "NODE_RANK"):
        clean.pop(key, None)
    full_env = {
        **clean,
        "PATH": f"{Path(sys.executable).parent}:{clean['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
        "MULTITUNE_VOLUME": str(tmp_path),
        **env,
    }
    return subprocess.run(
        ["bash", str(START), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_start_turns_runpod_variables_into_torchrun_and_uses_the_volume(tmp_path: Path):
    result = run_start(
        tmp_path,
        [str(REPO / "configs" / "demo.yaml"), "output_dir=/workspace/runs/x", "--dry-run"],
        PRIMARY_ADDR="10.65.0.2",
        PRIMARY_PORT="29500",
        NODE_RANK="2",
        NUM_NODES="3",
        NUM_TRAINERS="4",
        HF_TOKEN="hf_x",
        WANDB_API_KEY="k",
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1]
    assert command.startswith("torchrun --nnodes 3 --nproc-per-node 4 ")
    assert "--rdzv-endpoint 10.65.0.2:29500" in command
    assert command.endswith("output_dir=/workspace/runs/x")
    assert {p.name for p in tmp_path.iterdir()} == {"hf-cache", "wandb", "torch-extensions"}
    assert "HF_TOKEN is not set" not in result.stderr


def test_start_warns_about_missing_secrets(tmp_path: Path):
    result = run_start(tmp_path, [str(REPO / "configs" / "demo.yaml"), "--dry-run"])
    assert result.returncode == 0, result.stderr
    assert "HF_TOKEN is not set" in result.stderr
    assert "WANDB_API_KEY is not set" in result.stderr

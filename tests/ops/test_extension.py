"""Backend selection: build cache location, the reference fallback and its single warning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multitune import ops
from multitune.ops import extension

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter so MULTITUNE_DISABLE_CPP is seen before the first op call.
_FALLBACK_SCRIPT = """
import json, torch
from multitune import ops
torch.manual_seed(0)
hidden, weight = torch.randn(12, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
targets = torch.randint(0, 9, (12,)); targets[::4] = -100
print(json.dumps({
    "backend": ops.active_backend(),
    "error": ops.extension_error(),
    "loss": ops.linear_cross_entropy(hidden, weight, targets, chunk_size=5).tolist(),
    "plan": ops.plan_packing([5, 3, 8, 1, 9, 2, 2, 7], 10, 2, 4),
}))
"""


def test_sources_are_found_beside_src():
    assert extension.find_csrc() == REPO_ROOT / "csrc"
    assert (REPO_ROOT / "csrc" / "registration.cpp").is_file()


def test_build_cache_honours_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTITUNE_EXTENSION_DIR", str(tmp_path))
    assert extension.extension_dir().parent == tmp_path
    assert torch.__version__.replace("+", "_") in extension.extension_dir().name
    monkeypatch.delenv("MULTITUNE_EXTENSION_DIR")
    expected = Path.home() / ".cache" / "multitune" / "torch_extensions"
    assert extension.extension_dir().parent == expected


@pytest.mark.usefixtures("cpp_backend")
def test_disable_env_forces_reference_with_identical_results():
    env = {**os.environ, "MULTITUNE_DISABLE_CPP": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    fallback = json.loads(result.stdout)
    assert fallback["backend"] == "reference"
    assert fallback["error"] == "disabled by MULTITUNE_DISABLE_CPP=1"
    assert "unavailable" not in result.stderr  # a deliberate choice is not warned about

    torch.manual_seed(0)
    hidden = torch.randn(12, 5, dtype=torch.float64)
    weight = torch.randn(9, 5, dtype=torch.float64)
    targets = torch.randint(0, 9, (12,))
    targets[::4] = -100
    assert ops.active_backend() == "cpp"
    cpp_loss = ops.linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    torch.testing.assert_close(
        torch.tensor(fallback["loss"], dtype=torch.float64), cpp_loss, rtol=0, atol=1e-12
    )
    assert fallback["plan"] == ops.plan_packing([5, 3, 8, 1, 9, 2, 2, 7], 10, 2, 4)


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def broken_build() -> None:
        raise RuntimeError(
            "Error building extension 'multitune_ops': [1/5] c++ -c x.cpp\n"
            "x.cpp:3:1: error: expected ';'\nninja: build stopped"
        )

    monkeypatch.delenv("MULTITUNE_DISABLE_CPP", raising=False)
    monkeypatch.setattr(extension, "_build", broken_build)
    monkeypatch.setattr(extension, "_backend", None)
    monkeypatch.setattr(extension, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="multitune.ops.extension"):
        assert ops.active_backend() == "reference"
        monkeypatch.setattr(extension, "_backend", None)  # a second resolution in-process
        assert ops.active_backend() == "reference"
        hidden, weight = torch.randn(4, 3), torch.randn(6, 3)
        loss = ops.linear_cross_entropy(hidden, weight, torch.tensor([1, -100, 5, 0]))
    assert len(caplog.records) == 1
    assert "x.cpp:3:1: error: expected ';'" in caplog.records[0].getMessage()
    assert "ninja" not in caplog.records[0].getMessage()  # summarised, not the whole log
    assert "ninja: build stopped" in ops.extension_error()
    torch.testing.assert_close(
        loss, ops.reference_linear_cross_entropy(hidden, weight, torch.tensor([1, -100, 5, 0]))
    )


def test_a_dead_build_s_lock_is_removed_and_a_live_one_waited_for(tmp_path, caplog):
    """A build killed midway leaves torch's ``lock`` file, on which every later run waited
    forever; a live build's lock must be waited for, not taken."""
    import threading
    import time

    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="multitune.ops.extension"):
        extension.clear_stale_build_lock(tmp_path, stale_after=60)
    assert not lock.exists()
    assert "3600 s old" in caplog.text

    lock.touch()  # a live build: its holder removes the lock after a moment
    threading.Timer(0.5, lock.unlink).start()
    start = time.monotonic()
    extension.clear_stale_build_lock(tmp_path, stale_after=60)
    assert 0.4 < time.monotonic() - start < 30
    assert not lock.exists()

    lock.touch()  # a lock that stays: removed once it is older than the limit
    start = time.monotonic()
    extension.clear_stale_build_lock(tmp_path, stale_after=1.5)
    assert 1.4 < time.monotonic() - start < 30
    assert not lock.exists()

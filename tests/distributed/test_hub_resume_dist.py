"""Resuming from the Hub's checkpoint mirror on 2 gloo processes: local rank 0 downloads (once,
through a verified temporary folder), the other rank waits, and both resume from one folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_checkpoint import save_run  # noqa: E402
from tests.fake_hub import FakeHub  # noqa: E402

from multitune.checkpoint import find_resume_checkpoint, verify_checkpoint  # noqa: E402
from multitune.distributed.process_group import DistContext  # noqa: E402

pytestmark = pytest.mark.distributed
WORLD_SIZE = 2
REPO_ID = "alice/run"


def _worker(rank: int, port: int, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from multitune.training.loop import download_resume_checkpoint

        ctx = DistContext(rank, WORLD_SIZE, rank, WORLD_SIZE, torch.device("cpu"), True)
        found = download_resume_checkpoint(REPO_ID, root, ctx)
        # Past the wait, the folder is complete on every rank.
        seen = sorted(p.name for p in root.iterdir())
        path = find_resume_checkpoint(root)
        (root.parent / f"rank{rank}.json").write_text(
            json.dumps({"found": found, "seen": seen, "path": str(path)})
        )
    finally:
        dist.destroy_process_group()


def test_only_local_rank_zero_downloads_the_hub_checkpoint_and_the_other_waits(
    tmp_path, monkeypatch
):
    from multitune.hub.push import CHECKPOINT_BRANCH, push_checkpoint

    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.start())
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read by the workers' huggingface_hub at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        pushed = tmp_path / "pod1" / "checkpoints"
        save_run(pushed, [2])
        push_checkpoint(pushed / "step-00000002", REPO_ID)
        files = hub.files(REPO_ID, CHECKPOINT_BRANCH)
        before = len(hub.requests)

        root = tmp_path / "pod2" / "checkpoints"
        mp.spawn(_worker, args=(free_port(), root), nprocs=WORLD_SIZE)
        requests = hub.requests[before:]
        downloads = [path for method, path in requests if method == "GET" and "/resolve/" in path]
    finally:
        hub.stop()

    # Every file once: rank 1 downloaded nothing (two ranks downloading would double this).
    assert len(downloads) == len(files) > 1
    assert sorted(downloads) == sorted(set(downloads))
    results = [json.loads((tmp_path / "pod2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["found"] is True
        # Nothing half-downloaded left beside the committed folder.
        assert result["seen"] == ["step-00000002"]
        assert result["path"] == str(root / "step-00000002")
    assert verify_checkpoint(root / "step-00000002") == []

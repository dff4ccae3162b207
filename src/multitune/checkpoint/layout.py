"""Names on disk: which folders are committed checkpoints, and what a step folder holds.

root/
  step-00000200/                committed: renamed into place after its manifest was written
    manifest.json               step, world size, config hash, size + sha256 of every file
    train_state.json            step, epoch, examples consumed, tracker run id, ...
    scheduler.pt                LR scheduler state_dict (rank 0)
    rng-rank0.pt, rng-rank1.pt  one RNG state per rank
    dcp/.metadata, dcp/__0_0.distcp, ...   torch.distributed.checkpoint: trainable
                                parameters ("model.*") and optimizer state ("optim.*")
  step-00000300.tmp-1a2b3c4d/   being written, or left by a killed run: never resumed from
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST_FILE = "manifest.json"
TRAIN_STATE_FILE = "train_state.json"
SCHEDULER_FILE = "scheduler.pt"
DCP_DIR = "dcp"
TMP_MARKER = ".tmp-"

_COMMITTED = re.compile(r"step-(\d{8,})")
_TEMPORARY = re.compile(r"step-\d{8,}\.tmp-.+")


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(folder: Path) -> int:
    """The step a step folder (committed or temporary) was saved at."""
    return int(Path(folder).name.split(".", 1)[0].removeprefix("step-"))


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def list_committed(root: Path) -> list[Path]:
    """Committed step folders under ``root``, ascending by step; ``.tmp-*`` folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _COMMITTED.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def list_temporary(root: Path) -> list[Path]:
    """Uncommitted ``step-*.tmp-*`` folders: being written now, or left by a killed run."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_dir())

"""The commit contract: a step folder counts only once renamed into place with its manifest.

A run killed at any moment leaves either a ``.tmp-*`` folder (ignored, purged later) or a
committed folder whose files its manifest describes; resume picks the newest committed folder
that still matches its manifest.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from multitune.checkpoint.layout import TMP_MARKER, list_committed, list_temporary, step_of
from multitune.checkpoint.manifest import (
    CheckpointError,
    build_manifest,
    fsync_dir,
    verify_checkpoint,
    write_manifest,
)
from multitune.checkpoint.ranks import broadcast_from_rank0, rank_and_world_size

log = logging.getLogger(__name__)


def temporary_name(final_name: str) -> str:
    return f"{final_name}{TMP_MARKER}{secrets.token_hex(4)}"


def commit_checkpoint(
    tmp: Path, final: Path, step: int, world_size: int, cfg_hash: str | None
) -> None:
    """Rank 0 only, after every rank finished writing into ``tmp``: manifest, fsync, one rename."""
    write_manifest(tmp, build_manifest(tmp, step, world_size, cfg_hash))
    if final.exists():
        # Same step saved again (e.g. after resuming from an older checkpoint): the older copies
        # stay committed while this one is out of the way, so resume always has a candidate.
        log.warning("replacing existing checkpoint %s", final)
        _retire(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def purge_checkpoints(root: Path, keep_last: int, keep: Path) -> None:
    """Rank 0 only, after a commit: drop committed folders beyond the newest ``keep_last``.

    ``keep`` (the folder just committed) survives even when newer steps exist, and every
    ``.tmp-*`` folder is stale by now and goes too.
    """
    committed = list_committed(root)
    newer = [p.name for p in committed if step_of(p) > step_of(keep)]
    if newer:
        log.warning(
            "checkpoints newer than %s exist (%s); find_resume_checkpoint will prefer them",
            keep.name,
            ", ".join(newer),
        )
    for path in committed[:-keep_last]:
        if path != keep:
            log.info("purging checkpoint %s (keep_last=%d)", path, keep_last)
            _retire(path)
    for path in list_temporary(root):
        shutil.rmtree(path, ignore_errors=True)


def _retire(path: Path) -> None:
    """Uncommit with one rename first, so a kill mid-delete never leaves a half-deleted commit."""
    retired = path.with_name(temporary_name(path.name))
    os.rename(path, retired)
    fsync_dir(path.parent)
    shutil.rmtree(retired, ignore_errors=True)


def find_resume_checkpoint(root: Path) -> Path | None:
    """The newest committed checkpoint under ``root`` that matches its manifest.

    Older ones are tried in turn, with a warning naming each rejected folder and its problems.
    Returns None when nothing was ever committed; raises CheckpointError when checkpoints exist
    but none verifies (starting over would silently discard the run). Rank 0 decides and
    broadcasts, so every rank resumes from the same folder.
    """
    rank, _ = rank_and_world_size()
    decision = _choose_resume(Path(root)) if rank == 0 else None
    chosen, error = broadcast_from_rank0(decision)
    if error:
        raise CheckpointError(error)
    return Path(chosen) if chosen else None


def _choose_resume(root: Path) -> tuple[str | None, str | None]:
    committed = list_committed(root)
    for path in reversed(committed):
        problems = verify_checkpoint(path)
        if not problems:
            return str(path), None
        log.warning(
            "checkpoint %s failed verification and is skipped, falling back to an older one: %s",
            path,
            "; ".join(problems),
        )
    if committed:
        names = ", ".join(p.name for p in committed)
        return None, (
            f"no checkpoint under {root} verifies ({names}); see the warnings above. Move them "
            "away to start over, or point output_dir somewhere new"
        )
    return None, None

"""Checkpoints as a set of stateful objects with an atomic commit (see ``layout`` for the folders).

Save at the end of an optimizer step on every rank::

    save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler,
                    {"step": step, "epoch": epoch, "examples_consumed": n}, keep_last=2,
                    config_hash=config_hash(cfg.model_dump(mode="json")))

and resume before the loop::

    path = find_resume_checkpoint(out / "checkpoints")
    if path is not None:
        train_state = load_checkpoint(path, model, optimizer, scheduler, verify=False)
"""

from multitune.checkpoint.checkpointer import (
    PendingCheckpoint,
    check_trainable_tensors,
    load_checkpoint,
    save_checkpoint,
    start_checkpoint,
)
from multitune.checkpoint.commit import find_resume_checkpoint
from multitune.checkpoint.layout import list_committed, list_temporary
from multitune.checkpoint.manifest import (
    CheckpointError,
    Manifest,
    config_hash,
    read_manifest,
    verify_checkpoint,
)
from multitune.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "CheckpointError",
    "Manifest",
    "PendingCheckpoint",
    "capture_rng_state",
    "check_trainable_tensors",
    "config_hash",
    "find_resume_checkpoint",
    "list_committed",
    "list_temporary",
    "load_checkpoint",
    "read_manifest",
    "restore_rng_state",
    "save_checkpoint",
    "start_checkpoint",
    "verify_checkpoint",
]

"""Publishing a run to the Hub: the model (`multitune push`, ``hub.push``) and its checkpoints.

A pushed model repo holds the adapter (or the merged model), the tokenizer, the resolved
``config.yaml``, ``eval_results.json`` and the model card ``README.md``. With
``hub.push_checkpoints`` every committed checkpoint is mirrored to the repo's ``checkpoints``
branch under ``checkpoints/step-N/``, so that a fresh machine with the same config and an empty
output dir resumes from it (``download_latest_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from multitune.checkpoint.layout import list_committed, step_of
from multitune.hub.card import write_model_card
from multitune.hub.checks import HubError, explained_hub_errors, hub_api, require_token

log = logging.getLogger(__name__)

CHECKPOINT_BRANCH = "checkpoints"
CHECKPOINT_FOLDER = "checkpoints"
RUN_FILES = ("config.yaml", "eval_results.json", "data_report.json")


def stage_run(output_dir: Path, staging: Path, repo_id: str, merged: bool = False) -> Path:
    """Lay out in ``staging`` exactly the files a pushed repo holds; returns ``staging``."""
    output_dir = Path(output_dir)
    adapter = output_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise HubError(
            f"{output_dir} has no adapter/adapter_config.json; push needs the output folder of "
            "a finished `multitune train` run"
        )
    if merged:
        from multitune.export.merge import export_merged

        export_merged(output_dir, staging)  # weights, config and tokenizer
    else:
        shutil.copytree(adapter, staging, dirs_exist_ok=True)  # adapter files and tokenizer
        if (output_dir / "base_model").is_dir():
            # The built-in tiny base exists nowhere else; ship it so the repo is loadable.
            shutil.copytree(output_dir / "base_model", staging / "base_model")
    for name in RUN_FILES:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, staging / name)
    write_model_card(output_dir, repo_id, dest=staging, merged=merged)
    return staging


def push_run(output_dir: Path, repo_id: str, *, private: bool = False, merged: bool = False) -> str:
    """Upload a finished run to ``repo_id`` (created when missing); returns the repo URL."""
    token = require_token("push")
    api = hub_api()
    with tempfile.TemporaryDirectory(prefix="multitune-push-") as tmp:
        staging = stage_run(Path(output_dir), Path(tmp) / "repo", repo_id, merged)
        with explained_hub_errors(f"push to {repo_id}"):
            api.create_repo(repo_id, private=private, exist_ok=True, token=token)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                token=token,
                commit_message=f"multitune: {'merged model' if merged else 'LoRA adapter'}",
            )
    url = f"{api.endpoint.rstrip('/')}/{repo_id}"
    log.info("pushed %s to %s", output_dir, url)
    return url


def push_checkpoint(step_dir: Path, repo_id: str) -> None:
    """Mirror the committed checkpoints beside ``step_dir`` to the repo's checkpoints branch.

    One commit adds ``step_dir`` and deletes the remote step folders no longer kept locally
    (``checkpoint.keep_last``), so the branch holds what OUTPUT_DIR/checkpoints holds.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    token = require_token("hub.push_checkpoints")
    api = hub_api()
    step_dir = Path(step_dir)
    kept = {p.name for p in list_committed(step_dir.parent)}
    remote_prefix = f"{CHECKPOINT_FOLDER}/{step_dir.name}"
    with explained_hub_errors(f"hub.push_checkpoints to {repo_id}"):
        api.create_repo(repo_id, private=True, exist_ok=True, token=token)
        api.create_branch(repo_id, branch=CHECKPOINT_BRANCH, exist_ok=True, token=token)
        operations = [
            CommitOperationAdd(f"{remote_prefix}/{f.relative_to(step_dir).as_posix()}", f)
            for f in sorted(step_dir.rglob("*"))
            if f.is_file()
        ]
        operations += [
            CommitOperationDelete(f"{CHECKPOINT_FOLDER}/{name}/", is_folder=True)
            for name in remote_checkpoints(repo_id, token)
            if name not in kept
        ]
        api.create_commit(
            repo_id,
            operations,
            commit_message=f"multitune checkpoint {step_dir.name}",
            revision=CHECKPOINT_BRANCH,
            token=token,
        )
    log.info("mirrored %s to %s (branch %s)", step_dir.name, repo_id, CHECKPOINT_BRANCH)


def remote_checkpoints(repo_id: str, token: str | None) -> list[str]:
    """Step folder names on the checkpoints branch, ascending; [] when the branch is missing."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = hub_api()
    try:
        entries = api.list_repo_tree(
            repo_id, path_in_repo=CHECKPOINT_FOLDER, revision=CHECKPOINT_BRANCH, token=token
        )
        names = [Path(e.path).name for e in entries if e.path.count("/") == 1]
    except (RevisionNotFoundError, EntryNotFoundError, RepositoryNotFoundError):
        return []
    return sorted((n for n in names if n.startswith("step-")), key=lambda n: step_of(Path(n)))


def download_latest_checkpoint(repo_id: str, checkpoints_root: Path) -> Path | None:
    """Download the newest checkpoint of the repo's checkpoints branch into
    ``checkpoints_root``; None when the repo or branch holds none.

    The files land in a temporary folder of this process, are verified against their manifest
    and only then renamed to ``step-N``, so a half-downloaded folder never looks committed. Call
    it on one process per disk (``sft.download_resume_checkpoint``): when another node's process
    renamed the same step first (a shared disk), that copy is kept and this one dropped.
    """
    from huggingface_hub import snapshot_download

    from multitune.checkpoint import CheckpointError, verify_checkpoint

    token = os.environ.get("HF_TOKEN") or None
    root = Path(checkpoints_root)
    with explained_hub_errors(f"resume from hub.repo {repo_id}"):
        names = remote_checkpoints(repo_id, token)
        if not names:
            return None
        name = names[-1]
        log.info("no local checkpoint: downloading %s from %s", name, repo_id)
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=root))
        try:
            snapshot_download(
                repo_id,
                revision=CHECKPOINT_BRANCH,
                allow_patterns=[f"{CHECKPOINT_FOLDER}/{name}/*", f"{CHECKPOINT_FOLDER}/{name}/**"],
                local_dir=partial,
                token=token,
                endpoint=hub_api().endpoint,
            )
            downloaded = partial / CHECKPOINT_FOLDER / name
            problems = verify_checkpoint(downloaded)
            if problems:
                raise CheckpointError(
                    f"{name} downloaded from {repo_id} fails verification: " + "; ".join(problems)
                )
            try:
                downloaded.rename(root / name)
            except OSError:
                if not (root / name).is_dir():
                    raise  # not a rename lost to another node's download
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return root / name

"""The manifest of a step folder: what every file should be, and the check that it still is."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from multitune.checkpoint.layout import MANIFEST_FILE, step_folder_name

MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, committed or trusted."""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the step folder, POSIX separators
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    config_hash: str | None
    created: str
    torch_version: str
    files: tuple[FileRecord, ...]
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        files = tuple(FileRecord(**record) for record in raw.pop("files"))
        return cls(files=files, **raw)


def config_hash(cfg_dict: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no whitespace); paths become strings."""

    def encode(value):
        if isinstance(value, os.PathLike):
            return Path(value).as_posix()
        raise TypeError(
            f"config_hash: {type(value).__name__} value {value!r} is not JSON; "
            "pass cfg.model_dump(mode='json') or plain dicts/lists/numbers/strings"
        )

    canonical = json.dumps(
        cfg_dict, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=encode
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_manifest(folder: Path, step: int, world_size: int, cfg_hash: str | None) -> Manifest:
    """Record size and sha256 of every file under ``folder`` (except the manifest itself)."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST_FILE:
            files.append(FileRecord(relative, path.stat().st_size, sha256_file(path)))
    return Manifest(
        step=step,
        world_size=world_size,
        config_hash=cfg_hash,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch_version=torch.__version__,
        files=tuple(files),
    )


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write and fsync the manifest, and fsync every folder in the checkpoint."""
    write_file_durably(folder / MANIFEST_FILE, manifest.to_json().encode("utf-8"))
    for sub in sorted({folder / Path(record.path).parent for record in manifest.files}):
        fsync_dir(sub)
    fsync_dir(folder)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a step folder; raises CheckpointError when missing or unreadable."""
    path = Path(folder) / MANIFEST_FILE
    try:
        return Manifest.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint was never committed") from None
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path} is unreadable: {error}") from error


def verify_checkpoint(path: Path) -> list[str]:
    """Problems found comparing a step folder with its manifest; an empty list means it is intact.

    Checks that the manifest exists and parses, that its step matches the folder name, and that
    every listed file exists with the recorded size and sha256.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as error:
        return [str(error)]
    problems = []
    if path.name != step_folder_name(manifest.step):
        problems.append(f"manifest says step {manifest.step} but the folder is {path.name}")
    for record in manifest.files:
        file = path / record.path
        if not file.is_file():
            problems.append(f"missing file {record.path}")
            continue
        size = file.stat().st_size
        if size != record.size:
            problems.append(
                f"size mismatch for {record.path}: manifest {record.size} B, disk {size} B"
            )
        elif sha256_file(file) != record.sha256:
            problems.append(f"sha256 mismatch for {record.path}")
    return problems

"""Load one split of a task's dataset: from the Hub through ``datasets``, or from local files."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from multitune.config.schema import TaskConfig
from multitune.tasks.base import TaskDataError
from multitune.tasks.registry import PARQUET_FALLBACKS

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
PARQUET_REVISION = "refs/convert/parquet"


def is_local(dataset: str) -> bool:
    return Path(dataset).exists() or dataset.startswith((".", "/", "~"))


def load_split(cfg: TaskConfig, split: str) -> datasets.Dataset:
    """Return ``split`` of the task's dataset, or raise ``TaskDataError`` saying what to do."""
    if is_local(cfg.dataset):
        return _load_local(Path(cfg.dataset).expanduser(), split, cfg)
    return _load_hub(cfg, split)


def _load_local(path: Path, split: str, cfg: TaskConfig) -> datasets.Dataset:
    if not path.exists():
        raise TaskDataError(f"task {cfg.name!r}: dataset path {path} does not exist")
    if path.is_file():
        if split != cfg.train_split:
            raise TaskDataError(
                f"task {cfg.name!r}: {path} is a single file, so it holds only the "
                f"'{cfg.train_split}' split; point dataset at a folder with {split}.* files, "
                "or unset test_split"
            )
        files = [path]
    else:
        files = _split_files(path, split)
        if not files:
            raise TaskDataError(
                f"task {cfg.name!r}: no files for split '{split}' in {path} "
                f"(looked for {split}.parquet/.jsonl/.json/.csv, {split}-*.*, {split}/*.*)"
            )
    suffixes = {f.suffix for f in files}
    if len(suffixes) != 1 or files[0].suffix not in FORMATS:
        raise TaskDataError(
            f"task {cfg.name!r}: split '{split}' needs files of one format among "
            f"{', '.join(FORMATS)}; found {', '.join(str(f) for f in files)}"
        )
    builder = FORMATS[files[0].suffix]
    try:
        return datasets.load_dataset(
            builder, data_files={split: [str(f) for f in files]}, split=split
        )
    except Exception as exc:  # datasets wraps parse errors in several types
        raise TaskDataError(f"task {cfg.name!r}: could not read {files[0]}: {exc}") from exc


def _split_files(folder: Path, split: str) -> list[Path]:
    patterns = [f"{split}.*", f"{split}-*.*", f"{split}/*.*", f"data/{split}-*.*"]
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.suffix in FORMATS)
        if found:
            return found
    return []


def _load_hub(cfg: TaskConfig, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=split, revision=cfg.revision)
    except RuntimeError as exc:
        if "scripts are no longer supported" not in str(exc):
            raise
        return _load_script_repo_fallback(cfg, split)
    except Exception as exc:
        raise _explain_hub_error(cfg.dataset, exc) from exc


def _load_script_repo_fallback(cfg: TaskConfig, split: str) -> datasets.Dataset:
    """A repo with only a loading script: use its parquet conversion, then known copies."""
    log.warning(
        "%s holds only a loading script, which datasets 5 does not run; "
        "using its parquet conversion (%s)",
        cfg.dataset,
        PARQUET_REVISION,
    )
    attempts = [(cfg.dataset, PARQUET_REVISION)] + [
        (copy, None) for copy in PARQUET_FALLBACKS.get(cfg.dataset, [])
    ]
    errors = []
    for repo, revision in attempts:
        try:
            data = datasets.load_dataset(repo, cfg.subset, split=split, revision=revision)
        except Exception as exc:
            errors.append(f"{repo}@{revision or 'main'}: {exc}")
            continue
        if repo != cfg.dataset:
            log.warning("loaded %s from its parquet copy %s", cfg.dataset, repo)
        return data
    raise TaskDataError(
        f"{cfg.dataset} holds only a loading script and no parquet copy could be loaded:\n  "
        + "\n  ".join(errors)
    )


def _explain_hub_error(dataset: str, exc: Exception) -> TaskDataError:
    name = type(exc).__name__
    text = str(exc)
    if name == "GatedRepoError" or "gated" in text.lower():
        return TaskDataError(
            f"{dataset} is gated: accept its terms at https://huggingface.co/datasets/{dataset} "
            "and log in (`hf auth login` or HF_TOKEN)"
        )
    if "OfflineModeIsEnabled" in text or isinstance(exc, ConnectionError):
        return TaskDataError(
            f"{dataset} is not in the local cache and the Hub cannot be reached ({text}); "
            "unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE with a network, or point the task's "
            "`dataset` at local files"
        )
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"):
        return TaskDataError(
            f"{dataset} was not found on the Hub (or is private and no token is set): {text}"
        )
    return TaskDataError(f"could not load {dataset}: {name}: {text}")

"""The one tracker a training run talks to: metrics.jsonl always, W&B when configured.

The loop calls ``start_tracking`` once, ``tracker.log(record)`` per train/validation record,
``tracker.log_evaluation(results, confusion_dir)`` after an evaluation and
``tracker.finish()`` at the end. On ranks other than 0 every call is a no-op, so the loop never
branches on the rank.

W&B steps. W&B refuses a ``step=`` lower than one it has seen, and a resumed run re-does the
optimizer steps between its last checkpoint and the crash. So records are logged without
``step=`` (W&B's own ``_step`` only grows) and carry the optimizer step as the metric ``step``,
which every chart uses as its x axis (``define_metric``). Steps logged after the last checkpoint
of a killed run therefore appear twice in W&B (and in metrics.jsonl, which is appended to): the
killed run's values, then the resumed run's.
"""

from __future__ import annotations

import math
import netrc
import os
import resource
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from multitune.checkpoint.ranks import rank_and_world_size
from multitune.config.schema import RunConfig
from multitune.tracking.jsonl import JsonlLogger

# Per-task evaluation rows kept for the W&B predictions table (see the runner's "samples").
SAMPLE_COLUMNS = ("task", "prompt", "prediction", "gold")


class TrackingError(RuntimeError):
    """A tracking backend cannot start; the message says how to fix it."""


def check_tracking_credentials(cfg: RunConfig) -> None:
    """Raise before any model is loaded when W&B is configured online without credentials."""
    if "wandb" not in cfg.tracking.backends or _wandb_mode(cfg) != "online":
        return
    _import_wandb()
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb_key():
        return
    raise TrackingError(
        "tracking.backends lists wandb with tracking.wandb.mode=online, but WANDB_API_KEY is not "
        "set (and `wandb login` has not stored a key). Fix: export WANDB_API_KEY=... (from "
        "https://wandb.ai/authorize), or set tracking.wandb.mode=offline (sync later with "
        "`wandb sync`) or remove wandb from tracking.backends"
    )


def _wandb_mode(cfg: RunConfig) -> str:
    # WANDB_MODE in the environment wins, as it does inside wandb itself.
    return os.environ.get("WANDB_MODE") or cfg.tracking.wandb.mode


def _netrc_has_wandb_key() -> bool:
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc().authenticators(host or ""))
    except (OSError, netrc.NetrcParseError):
        return False


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise TrackingError(
            "tracking.backends lists wandb, but wandb is not installed: "
            "pip install -e '.[tracking]' (or pip install wandb)"
        ) from None
    return wandb


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def wandb_record(record: dict) -> dict:
    """A metrics.jsonl record as W&B keys: ``train/loss``, ``validation/task/<t>/loss``, ..."""
    split = record.get("split", "train")
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "split" or (isinstance(value, float) and not math.isfinite(value)):
            continue
        out[key if key in ("step", "epoch") else f"{split}/{key}"] = value
    return out


def eval_metrics(results: dict) -> dict[str, float]:
    """Numeric per-task metrics of an eval_results dict as ``eval/<task>/<metric>``."""
    out = {}
    for prefix, tasks in (
        ("eval", results.get("tasks") or {}),
        ("eval_base", (results.get("base") or {}).get("tasks") or {}),
    ):
        for task, values in tasks.items():
            for metric, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{prefix}/{task}/{metric}"] = value
    return out


def prediction_rows(results: dict) -> list[list[str]]:
    """(task, prompt, prediction, gold) rows from the runner's per-task ``samples``."""
    return [
        [task, s["prompt"], s["prediction"], s["gold"]]
        for task, values in (results.get("tasks") or {}).items()
        for s in values.get("samples", [])
    ]


class Tracker:
    """Holds the open backends of one run; both are None on ranks other than 0."""

    def __init__(self, jsonl: JsonlLogger | None, wandb_run: Any = None) -> None:
        self.jsonl, self.wandb_run = jsonl, wandb_run
        self.last_step = 0

    @property
    def run_id(self) -> str | None:
        """The W&B run id, saved with each checkpoint so that a resumed run continues it."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict) -> None:
        self.last_step = record.get("step", self.last_step)
        if self.jsonl is not None:
            self.jsonl.log(record)
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_record(record))

    def log_evaluation(self, results: dict, confusion_dir: Path | None = None) -> None:
        """Per-task metrics, confusion matrix images and a table of sample predictions, at the
        last logged optimizer step."""
        if self.wandb_run is None:
            return
        import wandb

        data: dict[str, Any] = {"step": self.last_step, **eval_metrics(results)}
        if confusion_dir is not None and Path(confusion_dir).is_dir():
            for png in sorted(Path(confusion_dir).glob("*.png")):
                data[f"eval/{png.stem}/confusion"] = wandb.Image(str(png))
        rows = prediction_rows(results)
        if rows:
            data["eval/predictions"] = wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)
        self.wandb_run.log(data)
        self.wandb_run.summary.update(eval_metrics(results))

    def finish(self, exit_code: int = 0) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def start_tracking(cfg: RunConfig, out: Path, run_id: str | None = None) -> Tracker:
    """Open metrics.jsonl and, when configured, the W&B run ``run_id`` (new when None)."""
    if rank_and_world_size()[0] != 0:
        return Tracker(None)
    jsonl = JsonlLogger(Path(out) / "metrics.jsonl")
    if "wandb" not in cfg.tracking.backends or _wandb_mode(cfg) == "disabled":
        return Tracker(jsonl)
    check_tracking_credentials(cfg)
    wandb = _import_wandb()
    settings = cfg.tracking.wandb
    if wandb.run is not None:
        # Left open by a run in this process that raised (the CLI's exit hook would close it).
        wandb.run.finish(exit_code=1)
    run = wandb.init(
        project=settings.project,
        entity=settings.entity,
        name=settings.name or Path(cfg.output_dir).name,
        tags=settings.tags or None,
        mode=_wandb_mode(cfg),
        config=cfg.model_dump(mode="json"),
        id=run_id,
        resume="allow" if run_id else None,
        dir=os.environ.get("WANDB_DIR") or str(out),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return Tracker(jsonl, run)

"""Evaluation during training: the validation record for metrics.jsonl and the best checkpoint.

Every ``eval.every_steps`` optimizer steps, and once at the last step, the training loop runs the
same per-task evaluation as the final one (bounded by ``eval.max_examples``), logs every metric as
``task/<task>/<metric>`` (plus ``mean/<metric>`` over the tasks that report it) and keeps the
adapter with the best ``eval.best_metric`` as ``OUTPUT_DIR/best/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from multitune.checkpoint.ranks import broadcast_from_rank0
from multitune.config.schema import RunConfig
from multitune.data.pipeline import TaskData
from multitune.evaluation.runner import evaluate_tasks, metric_names

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_FILE = "best.json"
# Lower is better for these metric names; higher for every other one.
LOWER_IS_BETTER = ("loss", "perplexity")


def validation_record(
    results: dict[str, dict], step: int, epoch: float, lr: float, tokens_per_s: float
) -> dict:
    """One metrics.jsonl event from ``evaluate_tasks`` results.

    ``loss`` is the mean over all evaluated examples (each task weighted by its example count);
    ``mean/<metric>`` is the plain mean over the tasks that report the metric.
    """
    total = sum(r["n"] for r in results.values())
    record = {
        "step": step,
        "epoch": round(epoch, 4),
        "split": "validation",
        "loss": sum(r["loss"] * r["n"] for r in results.values()) / total,
        "lr": lr,
        "tokens_per_s": tokens_per_s,
    }
    by_metric: dict[str, list[float]] = {}
    for name, values in results.items():
        for metric, value in values.items():
            if metric == "n" or not isinstance(value, (int, float)):
                continue  # counts and lists (top_confused) stay in eval_results.json
            record[f"task/{name}/{metric}"] = value
            by_metric.setdefault(metric, []).append(value)
    for metric, values in sorted(by_metric.items()):
        record[f"mean/{metric}"] = sum(values) / len(values)
    return record


def best_mode(metric: str, mode: str | None) -> str:
    """``mode`` when set, else 'min' for loss/perplexity keys and 'max' otherwise."""
    if mode is not None:
        return mode
    return "min" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"


def available_metric_keys(tasks: list[TaskData]) -> list[str]:
    """Every key ``eval.best_metric`` may name for these tasks."""
    keys = {"loss"}
    for task in tasks:
        for metric in metric_names(task):
            keys.add(f"task/{task.spec.name}/{metric}")
            keys.add(f"mean/{metric}")
    return sorted(keys)


class BestCheckpoint:
    """Keeps the adapter with the best value of one metric as ``OUTPUT_DIR/best/``.

    ``best/`` holds the PEFT adapter and tokenizer (written by ``save``) and ``best.json`` with
    the step, metric, mode and value. It is written to ``best.tmp`` first and swapped in, so a
    crash while saving leaves the previous best or none, never a half-written one. A resumed run
    continues from the saved ``best.json`` so a worse later evaluation cannot replace it.
    """

    def __init__(
        self,
        out: Path,
        metric: str,
        mode: str | None,
        save: Callable[[Path], None],
        resumed: bool,
        is_main: bool = True,
    ) -> None:
        self.path = out / BEST_DIR
        self.is_main = is_main
        self.metric, self.mode = metric, best_mode(metric, mode)
        self.save = save
        self.step: int | None = None
        self.value: float | None = None
        saved = self.path / BEST_FILE
        if resumed and saved.is_file():
            previous = json.loads(saved.read_text())
            if (previous.get("metric"), previous.get("mode")) == (self.metric, self.mode):
                self.step, self.value = previous["step"], previous["value"]
            else:
                log.warning(
                    "%s was chosen by %s (%s); this run chooses by %s (%s) and will replace it",
                    self.path,
                    previous.get("metric"),
                    previous.get("mode"),
                    self.metric,
                    self.mode,
                )

    def improves(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, record: dict) -> bool:
        """Save the current adapter when ``record`` beats the best so far; True when saved."""
        if self.metric not in record:
            raise KeyError(
                f"eval.best_metric {self.metric!r} is not in the validation record; it has "
                + ", ".join(k for k in record if k == "loss" or "/" in k)
            )
        value = float(record[self.metric])
        # Rank 0 decides for all: another node may not see a resumed run's best.json.
        if not broadcast_from_rank0(self.improves(value)):
            return False
        # Every rank evaluated the same examples in lockstep, so all take this branch together:
        # ``save`` gathers a sharded adapter (a collective) and only the main rank writes.
        tmp = self.path.with_name(BEST_DIR + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.save(tmp)
        self.step, self.value = record["step"], value
        if not self.is_main:
            return True
        info = {"step": record["step"], "metric": self.metric, "mode": self.mode, "value": value}
        (tmp / BEST_FILE).write_text(json.dumps(info, indent=2))
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(tmp, self.path)
        log.info(
            "new best %s = %.4f at step %d: saved %s", self.metric, value, self.step, self.path
        )
        return True


class TrainingEvaluation:
    """When to evaluate during training, what to log, and the best checkpoint.

    The evaluation at the last step also writes the confusion matrices and is kept as
    ``final_results``, so the run's final evaluation reuses it instead of scoring twice.
    """

    def __init__(
        self,
        cfg: RunConfig,
        tasks: list[TaskData],
        out: Path,
        save: Callable[[Path], None],
        resumed: bool = False,
        is_main: bool = True,
    ) -> None:
        keys = available_metric_keys(tasks)
        if cfg.eval.best_metric not in keys:
            raise ValueError(
                f"eval.best_metric {cfg.eval.best_metric!r} is not a metric of these tasks; "
                f"choose one of: {', '.join(keys)}"
            )
        self.cfg, self.tasks, self.out = cfg, tasks, out
        self.best = BestCheckpoint(
            out, cfg.eval.best_metric, cfg.eval.best_mode, save, resumed, is_main
        )
        self.is_main = is_main
        self.final_results: dict | None = None

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(every and step % every == 0) or step == total_steps

    def run(
        self,
        model,
        tokenizer,
        step: int,
        total_steps: int,
        epoch: float,
        lr: float,
        tokens_per_s: float,
    ) -> dict:
        """Evaluate on the validation split; returns the record to log. Saves best/ if better."""
        final = step == total_steps
        results = evaluate_tasks(
            model,
            tokenizer,
            self.tasks,
            self.cfg,
            split="validation",
            confusion_dir=self.out / "confusion" if final and self.is_main else None,
        )
        if final:
            self.final_results = results
        record = validation_record(results, step, epoch, lr, tokens_per_s)
        self.best.update(record)
        return record

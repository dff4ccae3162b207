"""eval_results.json and the per-task table printed at the end of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from multitune.data.pipeline import TaskData
from multitune.evaluation.runner import chance_accuracy


def write_eval_results(
    out: Path,
    final: dict,
    split: str,
    adapter: str | None,
    base: dict | None,
    tasks: list[TaskData],
    dpo: dict | None = None,
) -> dict:
    results = {"tasks": final, "split": split, "adapter": adapter}
    if base is not None:
        results["base"] = {"tasks": base}
    if dpo is not None:
        results["dpo"] = dpo  # the DPO stage: {"tasks", "adapter", "preference"}
    results["chance"] = {t.spec.name: chance_accuracy(t) for t in tasks}
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    return results


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(tasks: list[TaskData], results: dict, console: Console | None = None) -> None:
    """Per task: examples, validation loss and accuracy before -> after (-> after DPO), chance."""
    # Off a terminal (CI logs, pipes) rich would wrap to 80 columns and cut the task names.
    console = console or Console(width=None if sys.stdout.isatty() else 140)
    base = (results.get("base") or {}).get("tasks", {})
    dpo = (results.get("dpo") or {}).get("tasks")
    table = Table(title=f"multitune: per-task results on {results['split']}")
    for column in (
        "task",
        "kind",
        "train/val/test",
        "loss before",
        "loss after",
        "acc before",
        "acc after",
        *(("loss dpo", "acc dpo") if dpo else ()),
        "chance",
    ):
        table.add_column(column, justify="left" if column in ("task", "kind") else "right")
    for task in tasks:
        name = task.spec.name
        after, before = results["tasks"][name], base.get(name, {})
        counts = "/".join(
            str(len(task.tokenized.get(s, []))) for s in ("train", "validation", "test")
        )
        table.add_row(
            name,
            task.spec.kind,
            counts,
            _fmt(before.get("loss")),
            _fmt(after.get("loss")),
            _fmt(before.get("accuracy")),
            _fmt(after.get("accuracy")),
            *((_fmt(dpo[name].get("loss")), _fmt(dpo[name].get("accuracy"))) if dpo else ()),
            _fmt(results["chance"].get(name)),
        )
    console.print(table)
    for warning in (results.get("dpo") or {}).get("warnings", []):
        console.print(f"warning: DPO lowered {warning}")

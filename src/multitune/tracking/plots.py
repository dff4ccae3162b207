"""OUTPUT_DIR/plots/: loss curves (train and validation, overall and per task) and the
confusion matrices, as PNG, drawn at the end of a run from metrics.jsonl and confusion/.

``loss_curves`` is a pure function of the records; matplotlib is optional (no plots, one
warning, when it is missing).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")


def loss_curves(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Curve name (``loss`` or a task name) -> split -> (step, loss) points sorted by step.

    A step logged twice (re-done after a resume, see tracking/tracker.py) keeps its last value,
    the one of the run that went on.
    """
    by_step: dict[str, dict[str, dict[int, float]]] = {}
    for record in records:
        split, step = record.get("split"), record.get("step")
        if split not in SPLITS or step is None:
            continue
        for key, value in record.items():
            if not isinstance(value, (int, float)) or value is None:
                continue
            if key == "loss":
                name = "loss"
            elif key.startswith("task/") and key.endswith("/loss"):
                name = key[len("task/") : -len("/loss")]
            else:
                continue
            by_step.setdefault(name, {}).setdefault(split, {})[step] = float(value)
    return {
        name: {split: sorted(points.items()) for split, points in splits.items()}
        for name, splits in by_step.items()
    }


def write_plots(output_dir: Path) -> list[Path]:
    """Draw every loss curve of OUTPUT_DIR/metrics.jsonl and copy the confusion PNGs into
    OUTPUT_DIR/plots/; returns the files written."""
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed; no plots in %s/plots", output_dir)
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    for name, splits in loss_curves(records).items():
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for split, points in splits.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=split)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("answer-token loss")
        ax.set_title("all tasks" if name == "loss" else name)
        ax.legend()
        fig.tight_layout()
        path = plots / ("loss.png" if name == "loss" else f"loss_{name.replace('/', '_')}.png")
        fig.savefig(path, dpi=100)
        written.append(path)
    for png in sorted((output_dir / "confusion").glob("*.png")):
        written.append(Path(shutil.copy2(png, plots / f"confusion_{png.name}")))
    return written

"""Loss curves for OUTPUT_DIR/plots: which points each curve gets, and the PNG files."""

from __future__ import annotations

import json

import pytest

from multitune.tracking.plots import loss_curves, write_plots


def records():
    return [
        {"step": 1, "split": "train", "loss": 3.0, "task/a/loss": 2.0, "task/b/loss": 4.0},
        {"step": 2, "split": "train", "loss": 2.5, "task/a/loss": 1.5, "lr": 0.1},
        {"step": 2, "split": "validation", "loss": 2.8, "task/a/loss": 2.1, "task/a/perplexity": 8},
        # Step 2 re-done after a resume: its last value wins.
        {"step": 2, "split": "train", "loss": 2.4, "task/a/loss": 1.4},
        {"step": 3, "split": "train", "loss": 2.0, "task/b/loss": 3.0},
    ]


def test_loss_curves_per_task_and_split_keep_the_last_value_of_a_step():
    curves = loss_curves(records())
    assert curves == {
        "loss": {"train": [(1, 3.0), (2, 2.4), (3, 2.0)], "validation": [(2, 2.8)]},
        "a": {"train": [(1, 2.0), (2, 1.4)], "validation": [(2, 2.1)]},
        "b": {"train": [(1, 4.0), (3, 3.0)]},
    }


def test_write_plots_draws_every_curve_and_copies_confusion_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    (tmp_path / "confusion").mkdir()
    (tmp_path / "confusion" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    written = write_plots(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["confusion_a.png", "loss.png", "loss_a.png", "loss_b.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes().startswith(b"\x89PNG")

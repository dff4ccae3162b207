"""A progress bar in a terminal, nothing elsewhere (logs carry the numbers)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(total: int, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        yield lambda advance, text: None
        return
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[text]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("train", total=total, text="")
        yield lambda advance, text: progress.update(bar, advance=advance, text=text)

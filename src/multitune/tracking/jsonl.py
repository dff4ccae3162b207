"""Metric logging: one JSON object per event in OUTPUT_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO


class JsonlLogger:
    """Appends events to ``metrics.jsonl``; flushed per event so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a")

    def log(self, record: dict) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 alone writes metrics.jsonl)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

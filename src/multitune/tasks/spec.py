"""A task after its columns and labels are resolved against the data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    source: str
    columns: dict[str, str]
    label_names: tuple[str, ...] | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None
    loss_weight: float = 1.0
    label_mapping: dict[str, str] | None = None
    answer_format: str | None = None  # multiple choice: "letter" or "text"

"""Chat: a ``messages`` list of {role, content}; every assistant turn is trained on."""

from __future__ import annotations

import datasets

from multitune.config.schema import TaskConfig
from multitune.tasks.base import Example, row_error
from multitune.tasks.columns import find_column
from multitune.tasks.spec import TaskSpec

ROLES = {"system", "user", "assistant"}


def resolve(cfg: TaskConfig, train: datasets.Dataset, index: int) -> TaskSpec:
    source = cfg.dataset or cfg.name
    column = find_column(
        "messages",
        train.column_names,
        cfg.columns.messages,
        source,
        f"tasks.{index}.columns.messages",
    )
    return TaskSpec(
        name=cfg.name,
        kind="chat",
        source=source,
        columns={"messages": column},
        system_prompt=cfg.system_prompt,
        loss_weight=cfg.loss_weight,
    )


def to_examples(data: datasets.Dataset, split: str, spec: TaskSpec) -> list[Example]:
    column = spec.columns["messages"]
    examples = []
    for row, record in enumerate(data):
        turns = record[column]
        if not isinstance(turns, list) or not turns:
            raise row_error(spec.source, split, row, column, "messages must be a non-empty list")
        messages = []
        for position, turn in enumerate(turns):
            role = turn.get("role") if isinstance(turn, dict) else None
            content = turn.get("content") if isinstance(turn, dict) else None
            if role not in ROLES:
                raise row_error(
                    spec.source,
                    split,
                    row,
                    column,
                    f"turn {position} has role {role!r}; expected one of {sorted(ROLES)}",
                )
            if not isinstance(content, str) or not content.strip():
                raise row_error(spec.source, split, row, column, f"turn {position} is empty")
            messages.append({"role": role, "content": content.strip()})
        if spec.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
        if messages[-1]["role"] != "assistant":
            raise row_error(
                spec.source, split, row, column, "the last turn must be the assistant's answer"
            )
        examples.append(
            Example(
                task=spec.name, row=row, messages=tuple(messages), answer=messages[-1]["content"]
            )
        )
    return examples

"""Question answering: question (+ optional context) -> free-text answer."""

from __future__ import annotations

import datasets

from multitune.config.schema import TaskConfig
from multitune.tasks.base import Example, chat, render_prompt, row_error
from multitune.tasks.columns import find_column
from multitune.tasks.spec import TaskSpec

TEMPLATE = "{question}"
TEMPLATE_WITH_CONTEXT = "Context: {context}\n\nQuestion: {question}"


def resolve(cfg: TaskConfig, train: datasets.Dataset, index: int) -> TaskSpec:
    source = cfg.dataset or cfg.name
    key = f"tasks.{index}.columns"
    names = train.column_names
    context = find_column(
        "context", names, cfg.columns.context, source, f"{key}.context", required=False
    )
    columns = {
        "question": find_column("question", names, cfg.columns.question, source, f"{key}.question"),
        "answer": find_column("answer", names, cfg.columns.answer, source, f"{key}.answer"),
    }
    if context:
        columns["context"] = context
    return TaskSpec(
        name=cfg.name,
        kind="qa",
        source=source,
        columns=columns,
        system_prompt=cfg.system_prompt,
        prompt_template=cfg.prompt_template or (TEMPLATE_WITH_CONTEXT if context else TEMPLATE),
        loss_weight=cfg.loss_weight,
    )


def _answer_text(value: object) -> str | None:
    """A plain string, or SQuAD's {"text": [...]} (the first answer is the training target)."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, list):
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def to_examples(data: datasets.Dataset, split: str, spec: TaskSpec) -> list[Example]:
    examples = []
    for row, record in enumerate(data):
        fields = dict(record)
        for role in ("question", "context"):
            column = spec.columns.get(role)
            if column is None:
                continue
            value = record[column]
            if not isinstance(value, str) or not value.strip():
                raise row_error(spec.source, split, row, column, f"the {role} is empty")
            fields[role] = value.strip()
        answer = _answer_text(record[spec.columns["answer"]])
        if answer is None:
            raise row_error(spec.source, split, row, spec.columns["answer"], "the answer is empty")
        prompt = render_prompt(spec.prompt_template, fields, spec.source)
        examples.append(
            Example(
                task=spec.name,
                row=row,
                messages=chat(spec.system_prompt, prompt, answer),
                answer=answer,
            )
        )
    return examples

"""Classification: text -> one label name from a closed set (banking77, claims, GLUE-like)."""

from __future__ import annotations

from pathlib import Path

import datasets

from multitune.config.schema import TaskConfig
from multitune.tasks.base import Example, TaskDataError, chat, render_prompt, row_error
from multitune.tasks.columns import find_column
from multitune.tasks.spec import TaskSpec

# The label list is spelled out only when it is short; constrained decoding keeps predictions
# inside the label set either way, and 77 intent names would multiply the prompt length.
MAX_LABELS_IN_PROMPT = 20
TEMPLATE_WITH_LABELS = "Classify the text. Answer with one of: {labels}.\n\nText: {text}"
TEMPLATE = "Classify the text. Answer with its label.\n\nText: {text}"


def resolve(cfg: TaskConfig, train: datasets.Dataset, index: int) -> TaskSpec:
    source = cfg.dataset or cfg.name
    key = f"tasks.{index}.columns"
    text_col = find_column("text", train.column_names, cfg.columns.text, source, f"{key}.text")
    label_col = find_column("label", train.column_names, cfg.columns.label, source, f"{key}.label")
    names = _label_names(cfg, train, label_col, source)
    template = cfg.prompt_template or (
        TEMPLATE_WITH_LABELS if len(names) <= MAX_LABELS_IN_PROMPT else TEMPLATE
    )
    return TaskSpec(
        name=cfg.name,
        kind="classification",
        source=source,
        columns={"text": text_col, "label": label_col},
        label_names=tuple(names),
        system_prompt=cfg.system_prompt,
        prompt_template=template,
        loss_weight=cfg.loss_weight,
        label_mapping=cfg.label_mapping,
    )


def _label_names(
    cfg: TaskConfig, train: datasets.Dataset, label_col: str, source: str
) -> list[str]:
    feature = train.features[label_col]
    if isinstance(cfg.label_names, list):
        names = list(cfg.label_names)
    elif isinstance(cfg.label_names, str):
        path = Path(cfg.label_names)
        if not path.is_file():
            raise TaskDataError(f"{source}: label_names file not found: {path}")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif cfg.label_mapping:
        names = list(dict.fromkeys(cfg.label_mapping.values()))
    else:
        values = [v for v in train[label_col] if v is not None]
        if values and all(isinstance(v, str) for v in values):
            names = sorted({v.strip() for v in values if v.strip()}, key=str.lower)
        else:
            raise TaskDataError(
                f"{source}: column '{label_col}' holds non-string labels without names; "
                "set label_names (a list or a file) or label_mapping in the task config"
            )
    if len(names) < 2:
        raise TaskDataError(f"{source}: a classification task needs at least 2 labels, got {names}")
    if len(set(names)) != len(names):
        raise TaskDataError(f"{source}: label names repeat: {names}")
    return names


def label_of(value: object, spec: TaskSpec, split: str, row: int) -> str:
    """Map a raw label value (id, name, or mapped string) onto a label name."""
    column = spec.columns["label"]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise row_error(spec.source, split, row, column, "the label is empty")
    if spec.label_mapping and str(value) in spec.label_mapping:
        value = spec.label_mapping[str(value)]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise row_error(spec.source, split, row, column, f"unsupported label value {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(spec.label_names):
            raise row_error(
                spec.source,
                split,
                row,
                column,
                f"label id {value} is outside 0..{len(spec.label_names) - 1}",
            )
        return spec.label_names[value]
    name = value.strip()
    if name not in spec.label_names:
        raise row_error(
            spec.source,
            split,
            row,
            column,
            f"label {name!r} is not in the label set ({', '.join(spec.label_names[:10])}"
            + (", ..." if len(spec.label_names) > 10 else "")
            + ")",
        )
    return name


def to_examples(data: datasets.Dataset, split: str, spec: TaskSpec) -> list[Example]:
    text_col, label_col = spec.columns["text"], spec.columns["label"]
    labels_text = ", ".join(spec.label_names)
    examples = []
    for row, record in enumerate(data):
        text = record[text_col]
        if not isinstance(text, str) or not text.strip():
            raise row_error(spec.source, split, row, text_col, "the text is empty")
        label = label_of(record[label_col], spec, split, row)
        fields = {**record, "text": text.strip(), "labels": labels_text, "label": label}
        prompt = render_prompt(spec.prompt_template, fields, spec.source)
        examples.append(
            Example(
                task=spec.name,
                row=row,
                messages=chat(spec.system_prompt, prompt, label),
                answer=label,
                stratum=label,
                candidates=spec.label_names,
            )
        )
    return examples

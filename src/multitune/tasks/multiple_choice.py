"""Multiple choice: question + choices -> the right choice (commonsense_qa layout).

``answer_format: letter`` (the default) lists lettered choices and trains the letter;
``answer_format: text`` lists the choices and trains the right choice's own text, which small
models learn far better than a letter-to-choice lookup (evaluation then decodes under a
per-question constraint that allows only that question's choice texts).
"""

from __future__ import annotations

import datasets

from multitune.config.schema import TaskConfig
from multitune.tasks.base import Example, chat, render_prompt, row_error
from multitune.tasks.columns import find_column
from multitune.tasks.spec import TaskSpec

# The fixed instruction comes first, so it is part of the prefix every example of the task
# shares (computed once per micro-batch, data.share_prefix).
TEMPLATE = "Answer with the letter of the correct choice.\n\n{question}\n\n{choices}"
TEXT_TEMPLATE = "Answer with the correct choice.\n\n{question}\n\nChoices:\n{choices}"
TEMPLATES = {"letter": TEMPLATE, "text": TEXT_TEMPLATE}


def resolve(cfg: TaskConfig, train: datasets.Dataset, index: int) -> TaskSpec:
    source = cfg.dataset or cfg.name
    key = f"tasks.{index}.columns"
    names = train.column_names
    answer_format = cfg.answer_format or "letter"
    return TaskSpec(
        name=cfg.name,
        kind="multiple_choice",
        source=source,
        columns={
            "question": find_column(
                "question", names, cfg.columns.question, source, f"{key}.question"
            ),
            "choices": find_column("choices", names, cfg.columns.choices, source, f"{key}.choices"),
            "answer": find_column("answer", names, cfg.columns.answer, source, f"{key}.answer"),
        },
        system_prompt=cfg.system_prompt,
        prompt_template=cfg.prompt_template or TEMPLATES[answer_format],
        loss_weight=cfg.loss_weight,
        answer_format=answer_format,
    )


def _choices(value: object, spec: TaskSpec, split: str, row: int) -> tuple[list[str], list[str]]:
    """Accept {label: [...], text: [...]} (commonsense_qa) or a plain list of texts."""
    column = spec.columns["choices"]
    if isinstance(value, dict) and "text" in value:
        texts = list(value["text"])
        letters = list(value.get("label") or [chr(65 + i) for i in range(len(texts))])
    elif isinstance(value, list):
        texts = list(value)
        letters = [chr(65 + i) for i in range(len(texts))]
    else:
        raise row_error(spec.source, split, row, column, "choices must be {label, text} or a list")
    if len(texts) < 2 or len(texts) != len(letters):
        raise row_error(spec.source, split, row, column, f"needs >= 2 choices, got {texts!r}")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise row_error(spec.source, split, row, column, "a choice text is empty")
    return letters, texts


def to_examples(data: datasets.Dataset, split: str, spec: TaskSpec) -> list[Example]:
    q_col, a_col = spec.columns["question"], spec.columns["answer"]
    examples = []
    for row, record in enumerate(data):
        question = record[q_col]
        if not isinstance(question, str) or not question.strip():
            raise row_error(spec.source, split, row, q_col, "the question is empty")
        letters, texts = _choices(record[spec.columns["choices"]], spec, split, row)
        answer = record[a_col]
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(letters):
            answer = letters[answer]
        if not isinstance(answer, str) or not answer.strip():
            raise row_error(spec.source, split, row, a_col, "the answer is empty")
        answer = answer.strip()
        if answer not in letters:
            raise row_error(
                spec.source, split, row, a_col, f"answer {answer!r} is not one of {letters}"
            )
        texts = [t.strip() for t in texts]
        if spec.answer_format == "text":
            if len(set(texts)) < len(texts):
                raise row_error(
                    spec.source, split, row, spec.columns["choices"],
                    f"two choices have the same text {texts!r}; answer_format text cannot tell "
                    "them apart (use answer_format: letter)",
                )  # fmt: skip
            listing = "\n".join(f"- {text}" for text in texts)
            target, candidates = texts[letters.index(answer)], tuple(texts)
        else:
            listing = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts))
            target, candidates = answer, tuple(letters)
        fields = {**record, "question": question.strip(), "choices": listing}
        prompt = render_prompt(spec.prompt_template, fields, spec.source)
        examples.append(
            Example(
                task=spec.name,
                row=row,
                messages=chat(spec.system_prompt, prompt, target),
                answer=target,
                stratum=answer,  # the letter: stratified splits balance the answer positions
                candidates=candidates,
                choice_texts=tuple(texts),
            )
        )
    return examples

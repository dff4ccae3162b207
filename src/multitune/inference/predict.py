"""Batch inference: `multitune predict OUTPUT_DIR --input FILE.jsonl --output FILE.jsonl`.

An input row is one of:
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat; a final assistant turn is
  dropped (and written back as ``gold``) so the model answers it;
- ``{"prompt": "...", "system": "..." (optional)}``: one user turn;
- with ``--task NAME``: a row in that task's dataset schema (the columns the run's config maps,
  answer included). It is formatted exactly as in training and scored with the same code as
  evaluation (constrained labels, choice letters, or greedy generation), so it reproduces the
  evaluation's predictions.

Every output row is the input row plus ``prediction`` (and ``gold`` when the row has one).
Free-text answers come from batched greedy decoding up to the end-of-turn token.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from multitune.config import TaskConfig, validate_config
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample, render_chat, tokenize_example
from multitune.evaluation.runner import predict_answers
from multitune.evaluation.scoring import end_of_turn_id, greedy_generate
from multitune.evaluation.shared_prefix import prefix_sharing_allowed
from multitune.inference.loading import InferenceError, LoadedModel
from multitune.tasks import KINDS


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InferenceError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InferenceError(f"{path} line {number}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise InferenceError(f"{path} has no rows")
    return rows


def row_messages(row: dict, where: str) -> tuple[list[dict], str | None]:
    """The conversation to answer and the gold answer, from a ``messages`` or ``prompt`` row."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
        ):
            raise InferenceError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        gold = None
        if messages and messages[-1]["role"] == "assistant":
            messages, gold = messages[:-1], messages[-1]["content"]
        if not messages:
            raise InferenceError(f"{where}: 'messages' has no turn before the answer")
        return list(messages), gold
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise InferenceError(f"{where}: 'prompt' must be a non-empty string")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*system, {"role": "user", "content": row["prompt"]}], row.get("answer")
    raise InferenceError(
        f"{where}: a row needs 'messages' or 'prompt' (or pass --task NAME for a task's "
        f"own columns); it has {', '.join(sorted(row)) or 'no keys'}"
    )


def prompt_example(loaded: LoadedModel, messages: list[dict], index: int) -> TokenizedExample:
    """The chat rendered up to the assistant's turn, as the evaluation code takes it."""
    text = render_chat(loaded.tokenizer, messages, True, loaded.template_kwargs)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return TokenizedExample(ids, [IGNORE_INDEX] * len(ids), len(ids), 0, index, False)


def predict_messages(
    loaded: LoadedModel, conversations: list[list[dict]], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers to each conversation, batched with the KV cache."""
    examples = [prompt_example(loaded, m, i) for i, m in enumerate(conversations)]
    end_id = end_of_turn_id(loaded.tokenizer, loaded.template_kwargs)
    texts = greedy_generate(
        loaded.model, examples, loaded.tokenizer, end_id, batch_size, max_new_tokens
    )
    return [texts[i] for i in range(len(examples))]


def task_config(loaded: LoadedModel, name: str) -> tuple[TaskConfig, int]:
    """The run's config of task ``name`` and its index."""
    if loaded.run_config is None:
        raise InferenceError("--task needs a run's output folder (with config.yaml)")
    tasks = validate_config(loaded.run_config).tasks
    names = [t.name for t in tasks]
    if name not in names:
        raise InferenceError(f"--task {name}: the run's tasks are {', '.join(names)}")
    return tasks[names.index(name)], names.index(name)


def predict_task_rows(
    loaded: LoadedModel,
    rows: list[dict],
    name: str,
    label_names: list[str] | None,
    batch_size: int,
    max_seq_len: int,
    max_new_tokens: int,
) -> tuple[list[str], list[str]]:
    """(predictions, golds) for rows in task ``name``'s schema, scored as evaluation does."""
    task, index = task_config(loaded, name)
    if label_names:
        # The training run's label set, in its order (the rows given may not show every label).
        task = task.model_copy(update={"label_names": list(label_names)})
    kind = KINDS[task.kind]
    data = datasets.Dataset.from_list(rows)
    spec = kind.resolve(task, data, index)
    examples = kind.to_examples(data, "input", spec)
    tokenized = []
    for i, example in enumerate(examples):
        result = tokenize_example(
            example, loaded.tokenizer, max_seq_len, loaded.template_kwargs, 0, i
        )
        if isinstance(result, str):
            raise InferenceError(f"--task {name}: row {i} cannot be used ({result})")
        tokenized.append(result)
    preds, _ = predict_answers(
        loaded.model, loaded.tokenizer, spec, examples, tokenized, batch_size,
        loaded.template_kwargs, max_new_tokens, prefix_sharing_allowed(loaded.model),
    )  # fmt: skip
    return preds, [e.answer for e in examples]


def run_predict(
    loaded: LoadedModel,
    input_path: Path,
    output_path: Path,
    task: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
) -> int:
    """Write one output row per input row; returns the number of rows."""
    rows = read_jsonl(input_path)
    run = loaded.run_config or {}
    max_new_tokens = max_new_tokens or run.get("eval", {}).get("max_new_tokens", 64)
    if task is not None:
        label_names = None
        report_path = loaded.source / "data_report.json"
        if report_path.is_file():
            label_names = (json.loads(report_path.read_text()).get(task) or {}).get("label_names")
        max_seq_len = run.get("data", {}).get("max_seq_len", 1024)
        preds, golds = predict_task_rows(
            loaded, rows, task, label_names, batch_size, max_seq_len, max_new_tokens
        )
    else:
        parsed = [row_messages(row, f"{input_path} row {i + 1}") for i, row in enumerate(rows)]
        preds = predict_messages(loaded, [m for m, _ in parsed], batch_size, max_new_tokens)
        golds = [gold for _, gold in parsed]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w") as out:
        for row, pred, gold in zip(rows, preds, golds):
            record = {**row, "prediction": pred}
            if gold is not None:
                record["gold"] = gold
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(rows)

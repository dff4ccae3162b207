"""Built-in task entries (presets). A config names one with ``preset:`` and may override any key.

A preset is plain config: what the hub serves for that dataset, mapped onto a task kind.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "banking77": {
        "dataset": "PolyAI/banking77",
        "kind": "classification",
        "train_split": "train",
        "test_split": "test",
        "columns": {"text": "text", "label": "label"},
    },
    "commonsense_qa": {
        "dataset": "tau/commonsense_qa",
        "kind": "multiple_choice",
        "train_split": "train",
        # The hub's test split has no answerKey: its labelled validation split is our test set.
        "test_split": "validation",
        "columns": {"question": "question", "choices": "choices", "answer": "answerKey"},
    },
    "text_claims": {
        "dataset": "infinite-dataset-hub/TextClaimsDataset",
        "kind": "classification",
        "train_split": "train",
        # Column names are found by name at load time; see tasks/columns.py.
    },
}

# GLUE classification tasks (nyu-mll/glue): usable for training or as eval-only checks that
# fine-tuning kept general ability. Their test splits carry no labels (-1), so "validation" is
# the test set here. name -> (subset, text columns, label names in id order).
GLUE_TASKS = {
    "cola": ("cola", ["sentence"], ["unacceptable", "acceptable"]),
    "sst2": ("sst2", ["sentence"], ["negative", "positive"]),
    "mrpc": ("mrpc", ["sentence1", "sentence2"], ["not_equivalent", "equivalent"]),
    "qqp": ("qqp", ["question1", "question2"], ["not_duplicate", "duplicate"]),
    "mnli": ("mnli", ["premise", "hypothesis"], ["entailment", "neutral", "contradiction"]),
    "qnli": ("qnli", ["question", "sentence"], ["entailment", "not_entailment"]),
    "rte": ("rte", ["sentence1", "sentence2"], ["entailment", "not_entailment"]),
    "wnli": ("wnli", ["sentence1", "sentence2"], ["not_entailment", "entailment"]),
}
for _name, (_subset, _columns, _labels) in GLUE_TASKS.items():
    PRESETS[f"glue_{_name}"] = {
        "dataset": "nyu-mll/glue",
        "subset": _subset,
        "kind": "classification",
        "train_split": "train",
        "test_split": "validation_matched" if _name == "mnli" else "validation",
        "columns": {"text": _columns[0], "label": "label"},
        "label_names": _labels,
        "prompt_template": "Classify the text. Answer with one of: {labels}.\n\n"
        + "\n".join(f"{c}: {{{c}}}" for c in _columns),
    }

# When a hub repo holds only a loading script (which datasets >= 4 will not run), try these
# parquet copies in order after its own refs/convert/parquet revision.
PARQUET_FALLBACKS: dict[str, list[str]] = {
    "PolyAI/banking77": ["legacy-datasets/banking77"],
}


def resolve_task_preset(task: dict[str, Any]) -> dict[str, Any]:
    """Merge a task's ``preset`` defaults under its own keys (the task's keys win)."""
    name = task.get("preset")
    if name is None:
        return task
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise KeyError(f"unknown task preset {name!r}; built-in presets: {known}")
    merged = copy.deepcopy(PRESETS[name])
    for key, value in task.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    merged.setdefault("name", name)
    return merged

"""From config to tokenized train/validation/test examples per task, with a data report."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from multitune.config.schema import RunConfig, TaskConfig
from multitune.data.formatting import TokenizedExample, tokenize_example
from multitune.data.loading import load_split
from multitune.data.prefix_sharing import prefixes_to_share, shared_prefix_length
from multitune.data.splitting import split_indices
from multitune.tasks import KINDS
from multitune.tasks.base import Example, TaskDataError
from multitune.tasks.spec import TaskSpec

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


@dataclass
class TaskData:
    spec: TaskSpec
    examples: dict[str, list[Example]]
    rows_loaded: dict[str, int]
    tokenized: dict[str, list[TokenizedExample]] = field(default_factory=dict)
    dropped: dict[str, Counter] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    # Tokens every training example starts with (``shared_prefix_length``), and the part of
    # them a micro-batch computes once (``choose_prefix_sharing``; 0: the task runs unshared).
    shared_prefix: int = 0
    prefix_to_share: int = 0

    def mean_train_tokens(self) -> float:
        train = self.tokenized.get("train") or []
        return sum(len(e.input_ids) for e in train) / max(1, len(train))

    def report(self) -> dict:
        return {
            "kind": self.spec.kind,
            "source": self.spec.source,
            "rows_loaded": self.rows_loaded,
            "examples": {s: len(self.examples.get(s, [])) for s in SPLITS},
            "tokenized": {s: len(self.tokenized.get(s, [])) for s in self.tokenized},
            "dropped": {s: dict(c) for s, c in self.dropped.items() if c},
            "truncated": {s: n for s, n in self.truncated.items() if n},
            "label_names": list(self.spec.label_names) if self.spec.label_names else None,
            "shared_prefix": {
                "tokens": self.shared_prefix,
                "mean_suffix_tokens": round(self.mean_train_tokens() - self.shared_prefix, 2),
                "computed_once": self.prefix_to_share > 0,
            },
        }


def load_tasks(cfg: RunConfig, include_test: bool = True) -> list[TaskData]:
    """Load, validate and split every task; no tokenizer needed yet."""
    return [_load_task(task, index, cfg, include_test) for index, task in enumerate(cfg.tasks)]


def _load_task(task: TaskConfig, index: int, cfg: RunConfig, include_test: bool) -> TaskData:
    train_rows = load_split(task, task.train_split)
    rows_loaded = {task.train_split: len(train_rows)}
    if len(train_rows) == 0:
        raise TaskDataError(
            f"task {task.name!r}: split '{task.train_split}' of {task.dataset} is empty"
        )
    if task.max_examples and len(train_rows) > task.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(train_rows)), task.max_examples))
        train_rows = train_rows.select(keep)
    kind = KINDS[task.kind]
    spec = kind.resolve(task, train_rows, index)
    pool = kind.to_examples(train_rows, task.train_split, spec)
    train_idx, val_idx = split_indices(
        [e.stratum for e in pool], cfg.data.validation_fraction, cfg.seed
    )
    examples = {"train": [pool[i] for i in train_idx], "validation": [pool[i] for i in val_idx]}
    if include_test and task.test_split:
        test_rows = load_split(task, task.test_split)
        rows_loaded[task.test_split] = len(test_rows)
        examples["test"] = test_examples(kind, test_rows, task, spec)
    return TaskData(spec=spec, examples=examples, rows_loaded=rows_loaded)


def test_examples(kind, rows, task: TaskConfig, spec: TaskSpec) -> list[Example]:
    if len(rows) == 0:
        raise TaskDataError(
            f"task {task.name!r}: split '{task.test_split}' of {task.dataset} is empty"
        )
    return kind.to_examples(rows, task.test_split, spec)


def training_corpus(tasks: list[TaskData]) -> list[str]:
    """Texts the built-in tokenizer is trained on: every message of every training example."""
    return [m["content"] for t in tasks for e in t.examples["train"] for m in e.messages]


def tokenize_tasks(
    tasks: list[TaskData], tokenizer: PreTrainedTokenizerBase, cfg: RunConfig
) -> None:
    """Tokenize every split in place, counting drops and truncations by reason."""
    template_kwargs = {"date_string": cfg.data.template_date}
    for task_index, task in enumerate(tasks):
        for split, examples in task.examples.items():
            kept, dropped, truncated = [], Counter(), 0
            for example_index, example in enumerate(examples):
                result = tokenize_example(
                    example,
                    tokenizer,
                    cfg.data.max_seq_len,
                    template_kwargs,
                    task_index,
                    example_index,
                )
                if isinstance(result, str):
                    dropped[result] += 1
                    continue
                truncated += result.truncated
                kept.append(result)
            task.tokenized[split], task.dropped[split], task.truncated[split] = (
                kept,
                dropped,
                truncated,
            )
            if dropped or truncated:
                log.warning(
                    "task %s [%s]: dropped %s, truncated %d of %d (data.max_seq_len=%d)",
                    task.spec.name,
                    split,
                    dict(dropped) or 0,
                    truncated,
                    len(examples),
                    cfg.data.max_seq_len,
                )
        if not task.tokenized["train"]:
            raise TaskDataError(
                f"task {task.spec.name!r}: every training example was dropped "
                f"({dict(task.dropped['train'])}); raise data.max_seq_len"
            )
        task.shared_prefix = shared_prefix_length(task.tokenized["train"])


def choose_prefix_sharing(tasks: list[TaskData], cfg: RunConfig, attention: str) -> list[int]:
    """Per task, the prefix tokens a micro-batch computes once (``data.share_prefix``) under
    the model's resolved ``attention``; recorded on each task for the data report."""
    shared = prefixes_to_share(
        cfg.data.share_prefix,
        attention,
        [t.shared_prefix for t in tasks],
        [t.mean_train_tokens() for t in tasks],
    )
    for task, prefix in zip(tasks, shared):
        task.prefix_to_share = prefix
    on = [f"{t.spec.name} ({p} tokens)" for t, p in zip(tasks, shared) if p]
    log.info("shared prefixes computed once per micro-batch: %s", ", ".join(on) or "none")
    return shared

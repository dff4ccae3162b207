"""Count the tokens a run trains on, once per data/model setup, cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from multitune.config.schema import RunConfig
from multitune.data.loading import is_local
from multitune.data.mixing import epoch_order, task_probabilities
from multitune.data.pipeline import (
    TaskData,
    choose_prefix_sharing,
    load_tasks,
    tokenize_tasks,
    training_corpus,
)
from multitune.models.tiny import TINY_MODEL_NAME

log = logging.getLogger(__name__)


def token_count_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "multitune" / "token_counts"


def token_count_key(cfg: RunConfig) -> str:
    """Hash of what the count depends on: tasks, data and model sections, the seed (splits and
    sampling), and the size and mtime of local dataset files (so regenerated data recounts)."""
    files = []
    for task in cfg.tasks:
        if task.dataset and is_local(task.dataset):
            root = Path(task.dataset).expanduser()
            paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            files += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    payload = {
        "tasks": [t.model_dump(mode="json") for t in cfg.tasks],
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "seed": cfg.seed,
        # Shared prefixes are computed once per micro-batch: the count depends on its size.
        "micro_batch_size": cfg.train.micro_batch_size,
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def count_dataset_tokens(cfg: RunConfig, cache_dir: Path | None = None) -> dict:
    """Tokens of the tokenized training examples (after the validation split, drops and
    truncation), as ``{"num_tokens", "num_example_tokens", "num_answer_tokens", "num_examples",
    "max_example_tokens", "vocab_size", "per_task"}``. Cached as JSON keyed by
    ``token_count_key``.

    ``num_tokens`` counts the tokens the model computes: with ``data.share_prefix``, a task's
    shared prefix once per micro-batch holding the task (``prefix_tokens_saved``);
    ``num_example_tokens`` counts every example whole.

    Loads the data and the tokenizer only: the built-in model's tokenizer is trained on the task
    data exactly as ``train`` does; a hub model's tokenizer comes from its cache.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else token_count_cache_dir()
    cache_file = cache_dir / f"{token_count_key(cfg)}.json"
    if cache_file.is_file():
        return json.loads(cache_file.read_text())
    tasks = load_tasks(cfg, include_test=False)
    tokenizer = _load_tokenizer(cfg, training_corpus(tasks))
    tokenize_tasks(tasks, tokenizer, cfg)
    # The plan assumes sdpa for attn_implementation auto (see build_plan).
    attention = "sdpa" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    choose_prefix_sharing(tasks, cfg, attention)
    saved = prefix_tokens_saved(tasks, cfg)
    per_task = {}
    for task, task_saved in zip(tasks, saved):
        train = task.tokenized["train"]
        num_example_tokens = sum(len(e.input_ids) for e in train)
        per_task[task.spec.name] = {
            "num_examples": len(train),
            "num_tokens": num_example_tokens - task_saved,
            "num_example_tokens": num_example_tokens,
            "num_answer_tokens": sum(e.num_answer_tokens for e in train),
            "shared_prefix_tokens": task.prefix_to_share,
        }
    examples = [e for t in tasks for e in t.tokenized["train"]]
    counts = {
        "num_tokens": sum(p["num_tokens"] for p in per_task.values()),
        "num_example_tokens": sum(p["num_example_tokens"] for p in per_task.values()),
        "num_answer_tokens": sum(p["num_answer_tokens"] for p in per_task.values()),
        "num_examples": len(examples),
        "max_example_tokens": max(len(e.input_ids) for e in examples),
        "vocab_size": len(tokenizer),
        "per_task": per_task,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts, indent=2))
    tmp.replace(cache_file)
    log.info("counted %s training tokens; cached in %s", f"{counts['num_tokens']:,}", cache_file)
    return counts


def prefix_tokens_saved(tasks: list[TaskData], cfg: RunConfig) -> list[int]:
    """Per task, the prefix tokens an epoch does not compute: a shared prefix runs once per
    micro-batch holding the task instead of once per example, and the part of it that an
    earlier task of the micro-batch starts with (the chat template's system block) not at all
    (``data.prefix_sharing``'s prefix tree; that part counts for the earlier task).

    Counted on the first epoch's mixed order cut into micro-batches of
    ``train.micro_batch_size`` (one process, one row per micro-batch: a prefix repeated when a
    micro-batch needs more than one row is not counted).
    """
    sizes = [len(t.tokenized["train"]) for t in tasks]
    weights = [t.sampling_weight for t in cfg.tasks]
    order = epoch_order(sizes, task_probabilities(sizes, cfg.data, weights), cfg.seed, 0)
    heads = [t.tokenized["train"][0].input_ids[: t.prefix_to_share] for t in tasks]
    micro = cfg.train.micro_batch_size
    computed = [0] * len(tasks)
    for start in range(0, len(order), micro):
        present = list(dict.fromkeys(task for task, _ in order[start : start + micro]))
        for number, task in enumerate(present):
            common = max(
                (len(os.path.commonprefix([heads[task], heads[t]])) for t in present[:number]),
                default=0,
            )
            computed[task] += len(heads[task]) - common
    examples = [0] * len(tasks)
    for task, _ in order:
        examples[task] += 1
    return [len(head) * n - k for head, n, k in zip(heads, examples, computed)]


def _load_tokenizer(cfg: RunConfig, corpus: list[str]):
    if cfg.model.name == TINY_MODEL_NAME:
        from multitune.models.loading import load_model_and_tokenizer

        _, tokenizer = load_model_and_tokenizer(cfg.model, corpus, cfg.seed, torch.device("cpu"))
        return tokenizer
    from transformers import AutoTokenizer

    from multitune.models.gguf import gguf_file_of
    from multitune.models.loading import ModelLoadError, explain_hub_model_error

    gguf = gguf_file_of(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    if gguf is not None:  # read from the file's metadata; no need to convert the weights
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        return AutoTokenizer.from_pretrained(
            cfg.model.name,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except Exception as exc:
        raise ModelLoadError(explain_hub_model_error(cfg.model.name, exc)) from exc

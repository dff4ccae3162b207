"""Evaluate every task of a run on one split with the metrics its kind uses."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from multitune.config.schema import RunConfig
from multitune.data.pipeline import TaskData
from multitune.evaluation import metrics
from multitune.evaluation.scoring import (
    answer_loss,
    choice_letters,
    constrained_labels,
    end_of_turn_id,
    label_trie,
)
from multitune.tasks.base import TaskDataError


def chance_accuracy(task: TaskData) -> float | None:
    """Accuracy of a uniform random guess, shown beside the model's for scale."""
    if task.spec.kind == "classification":
        return 1.0 / len(task.spec.label_names)
    if task.spec.kind == "multiple_choice":
        sizes = [len(e.candidates) for e in task.examples["train"]]
        return sum(1.0 / s for s in sizes) / len(sizes)
    return None


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[TaskData],
    cfg: RunConfig,
    split: str = "validation",
    with_predictions: bool = True,
) -> dict[str, dict[str, float]]:
    """Loss/perplexity for every task; accuracy for tasks with a closed answer set."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            results[task.spec.name] = _evaluate_task(
                model, tokenizer, task, cfg, split, with_predictions
            )
    finally:
        model.train(was_training)
    return results


def _evaluate_task(model, tokenizer, task: TaskData, cfg: RunConfig, split: str, with_predictions):
    if split not in task.tokenized:
        raise TaskDataError(
            f"task {task.spec.name!r} has no '{split}' split to evaluate (set test_split)"
        )
    examples = task.tokenized[split]
    if cfg.eval.max_examples:
        examples = examples[: cfg.eval.max_examples]
    if not examples:
        raise TaskDataError(f"task {task.spec.name!r}: the '{split}' split has no examples")
    pad_id = tokenizer.pad_token_id
    result = {"n": len(examples), **answer_loss(model, examples, cfg.eval.batch_size, pad_id)}
    if not with_predictions:
        return result
    source = task.examples[split]
    golds = [source[e.example_index].answer for e in examples]
    if task.spec.kind == "classification":
        end_id = end_of_turn_id(tokenizer, {"date_string": cfg.data.template_date})
        trie = label_trie(tokenizer, task.spec.label_names, end_id)
        predicted = constrained_labels(model, examples, trie, cfg.eval.batch_size, pad_id)
        preds = [task.spec.label_names[predicted[e.example_index]] for e in examples]
        result["accuracy"] = metrics.accuracy(preds, golds)
        result["macro_f1"] = metrics.macro_f1(preds, golds, labels=list(task.spec.label_names))
        result["mcc"] = metrics.mcc(preds, golds)
    elif task.spec.kind == "multiple_choice":
        candidates = {e.example_index: source[e.example_index].candidates for e in examples}
        predicted = choice_letters(
            model, examples, candidates, tokenizer, cfg.eval.batch_size, pad_id
        )
        preds = [candidates[e.example_index][predicted[e.example_index]] for e in examples]
        result["accuracy"] = metrics.accuracy(preds, golds)
    return result

"""Evaluate every task of a run on one split with the metrics its kind uses."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from multitune.config.schema import RunConfig
from multitune.data.formatting import TokenizedExample
from multitune.data.pipeline import TaskData
from multitune.distributed.strategy import reshard
from multitune.evaluation import metrics
from multitune.evaluation.scoring import (
    answer_loss,
    choice_letters,
    choice_text_scores,
    constrained_labels,
    end_of_turn_id,
    greedy_generate,
    label_trie,
)
from multitune.evaluation.shared_prefix import prefix_sharing_allowed
from multitune.tasks.base import Example, TaskDataError
from multitune.tasks.spec import TaskSpec

# Rows of (prompt, prediction, gold) kept per task in the results as "samples", for the W&B
# predictions table; a handful is enough to eyeball, and eval_results.json stays small.
NUM_SAMPLES = 5


def chance_accuracy(task: TaskData) -> float | None:
    """Accuracy of a uniform random guess, shown beside the model's for scale."""
    if task.spec.kind == "classification":
        return 1.0 / len(task.spec.label_names)
    if task.spec.kind == "multiple_choice":
        sizes = [len(e.candidates) for e in task.examples["train"]]
        return sum(1.0 / s for s in sizes) / len(sizes)
    return None


def metric_names(task: TaskData) -> tuple[str, ...]:
    """The metrics ``evaluate_tasks`` reports for a task (besides ``n`` and ``top_confused``)."""
    kind = task.spec.kind
    names = ("loss", "perplexity")
    if kind == "classification":
        names += ("accuracy", "macro_f1", "mcc")
        return names + (("f1",) if len(task.spec.label_names) == 2 else ())
    if kind == "multiple_choice" and task.spec.answer_format == "text":
        return names + ("accuracy",)
    if kind == "multiple_choice":
        return names + ("accuracy", "text_accuracy")
    names += ("bleu", "chrf", "rouge_l")
    return names + (("exact_match", "token_f1") if kind == "qa" else ())


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[TaskData],
    cfg: RunConfig,
    split: str = "validation",
    with_predictions: bool = True,
    confusion_dir: Path | None = None,
    share_prefix: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Loss/perplexity for every task; accuracy (+ macro-F1, MCC, confusion) for closed answer
    sets; BLEU/chrF/ROUGE-L (+ exact match, token F1 for QA) from greedy generation otherwise.
    ``confusion_dir`` receives a confusion matrix per classification task (JSON, and PNG when
    matplotlib is installed). ``share_prefix``: run each batch's common prompt prefix once
    (``shared_prefix``); the predictions are the same either way. Unset: as
    ``data.share_prefix`` says (``auto``: on, but off under flash-attention, where rows padded
    between prefix and prompt are not checked yet)."""
    if share_prefix is None:
        share_prefix = prefix_sharing_allowed(model, cfg.data.share_prefix)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            results[task.spec.name] = _evaluate_task(
                model, tokenizer, task, cfg, split, with_predictions, confusion_dir, share_prefix
            )
    finally:
        model.train(was_training)
        # A sharded model leaves the evaluation as it entered it: the embedding/head group
        # would otherwise keep its whole tensors, and a checkpoint or an optimizer built next
        # would see those instead of the sharded parameters.
        reshard(model)
    return results


def _evaluate_task(
    model,
    tokenizer,
    task: TaskData,
    cfg: RunConfig,
    split: str,
    with_predictions,
    confusion_dir,
    share_prefix: bool,
):
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
    if not with_predictions:
        loss = answer_loss(model, examples, cfg.eval.batch_size, pad_id, share_prefix)
        return {"n": len(examples), **loss}
    source = task.examples[split]
    golds = [source[e.example_index].answer for e in examples]
    spec = task.spec
    template_kwargs = {"date_string": cfg.data.template_date}
    preds, loss = predict_answers(
        model, tokenizer, spec, source, examples, cfg.eval.batch_size, template_kwargs,
        cfg.eval.max_new_tokens, share_prefix,
    )  # fmt: skip
    # Constrained decoding reads the gold answers in its prompt pass and gives the loss too.
    loss = loss or answer_loss(model, examples, cfg.eval.batch_size, pad_id, share_prefix)
    result = {"n": len(examples), **loss}
    result["samples"] = sample_predictions(source, examples, preds, golds)
    if spec.kind == "multiple_choice":
        result["answer_format"] = spec.answer_format
    if spec.kind in ("classification", "multiple_choice"):
        result["accuracy"] = metrics.accuracy(preds, golds)
    if spec.kind == "classification":
        labels = list(spec.label_names)
        result["macro_f1"] = metrics.macro_f1(preds, golds, labels=labels)
        result["mcc"] = metrics.mcc(preds, golds)
        if len(labels) == 2:
            # Binary tasks (GLUE's MRPC/QQP report it): F1 of the second label, the positive one.
            result["f1"] = metrics.binary_f1(preds, golds, positive=labels[1])
        matrix = metrics.confusion_matrix(preds, golds, labels)
        result["top_confused"] = metrics.top_confused_pairs(matrix, labels, k=10)
        if confusion_dir is not None:
            confusion_dir.mkdir(parents=True, exist_ok=True)
            name = spec.name.replace("/", "_")
            metrics.save_confusion_matrix(
                confusion_dir / f"{name}.json", matrix, labels, confusion_dir / f"{name}.png"
            )
    elif spec.kind == "multiple_choice" and spec.answer_format == "letter":
        # The same question answered by the choice texts themselves, each scored by its mean
        # token log-prob, in case the model knows the answer but not which letter it has.
        texts = {e.example_index: source[e.example_index].choice_texts for e in examples}
        scores = choice_text_scores(
            model, examples, texts, tokenizer, cfg.eval.batch_size, pad_id, share_prefix
        )
        by_text = []
        for e in examples:
            choice_scores = scores[e.example_index]
            letters = source[e.example_index].candidates
            by_text.append(letters[choice_scores.index(max(choice_scores))])
        result["text_accuracy"] = metrics.accuracy(by_text, golds)
    elif spec.kind in ("chat", "qa"):
        result["bleu"] = metrics.bleu(preds, golds)
        result["chrf"] = metrics.chrf(preds, golds)
        result["rouge_l"] = metrics.rouge_l(preds, golds)
        if spec.kind == "qa":
            result["exact_match"] = metrics.exact_match(preds, golds)
            result["token_f1"] = metrics.token_f1(preds, golds)
    return result


def predict_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    source: list[Example],
    examples: list[TokenizedExample],
    batch_size: int,
    template_kwargs: dict,
    max_new_tokens: int,
    share_prefix: bool = True,
) -> tuple[list[str], dict[str, float] | None]:
    """One predicted answer per tokenized example, as evaluation and ``predict`` score it, and
    the gold answers' loss/perplexity where the same pass computed them (else None).

    Classification: greedy decoding constrained to the label set. Multiple choice: the best
    letter in one forward pass (``answer_format: letter``), or decoding constrained to that
    question's own choice texts (``text``). Chat and QA: greedy generation. ``share_prefix``:
    run each batch's common prompt prefix once (``shared_prefix``).
    """
    pad_id = tokenizer.pad_token_id
    candidates = [source[e.example_index].candidates for e in examples]
    if spec.kind == "multiple_choice" and spec.answer_format == "letter":
        by_index = {e.example_index: c for e, c in zip(examples, candidates)}
        picked = choice_letters(
            model, examples, by_index, tokenizer, batch_size, pad_id, share_prefix
        )
        return [c[picked[e.example_index]] for e, c in zip(examples, candidates)], None
    end_id = end_of_turn_id(tokenizer, template_kwargs)
    if spec.kind == "classification":
        trie = label_trie(tokenizer, spec.label_names, end_id)
        picked, loss = constrained_labels(model, examples, trie, batch_size, pad_id, share_prefix)
        return [spec.label_names[picked[e.example_index]] for e in examples], loss
    if spec.kind == "multiple_choice":
        tries = {
            e.example_index: label_trie(tokenizer, c, end_id) for e, c in zip(examples, candidates)
        }
        picked, loss = constrained_labels(model, examples, tries, batch_size, pad_id, share_prefix)
        return [c[picked[e.example_index]] for e, c in zip(examples, candidates)], loss
    texts = greedy_generate(
        model, examples, tokenizer, end_id, batch_size, max_new_tokens, share_prefix
    )
    return [texts[e.example_index] for e in examples], None


def sample_predictions(source, examples, preds: list[str], golds: list[str]) -> list[dict]:
    """The first NUM_SAMPLES (prompt, prediction, gold) rows; the prompt is the last user turn."""
    return [
        {
            "prompt": source[e.example_index].prompt_messages[-1]["content"],
            "prediction": pred,
            "gold": gold,
        }
        for e, pred, gold in list(zip(examples, preds, golds))[:NUM_SAMPLES]
    ]

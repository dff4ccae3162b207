"""Preference pairs: read from a prompt/chosen/rejected dataset, or built from our own tasks.

A pair is a conversation prefix and two answers. Both answers are tokenized with the SFT
formatting (prompt masked, answer + end-of-turn labelled, the answer never cut), so DPO scores
exactly the tokens SFT trained on.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from multitune.config.schema import RunConfig, TaskConfig
from multitune.data.formatting import TokenizedExample, tokenize_example
from multitune.data.loading import load_split
from multitune.data.pipeline import TaskData
from multitune.data.prefix_sharing import shared_prefix_length, worth_sharing
from multitune.data.splitting import split_indices
from multitune.evaluation.shared_prefix import labelled_rows_forward
from multitune.losses.causal_lm import token_logprobs
from multitune.models.lora import decoder_and_head
from multitune.tasks.base import Example, TaskDataError, row_error
from multitune.training.dpo_step import TokenizedPair, grouped_logprobs
from multitune.training.step import uses_flash_attention

log = logging.getLogger(__name__)
CLOSED_ANSWER_KINDS = ("classification", "multiple_choice")


@dataclass(frozen=True)
class PreferencePair:
    source: str  # task name or dataset
    split: str
    row: int
    prompt: tuple[dict[str, str], ...]  # the conversation before the answer
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict, compare=False)  # e.g. mined scores

    def record(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "row": self.row,
            "prompt": list(self.prompt),
            "chosen": self.chosen,
            "rejected": self.rejected,
            **self.meta,
        }


# -- a preference dataset ---------------------------------------------------------------------


def load_preference_split(cfg: RunConfig, split: str) -> list[PreferencePair]:
    """Rows of ``dpo.dataset`` [split] as pairs; a bad row is an error naming it."""
    task = TaskConfig(name="dpo", dataset=cfg.dpo.dataset, train_split=cfg.dpo.split)
    rows = load_split(task, split)
    return pairs_from_rows(rows, cfg.dpo.dataset, split)


def pairs_from_rows(rows: datasets.Dataset, source: str, split: str) -> list[PreferencePair]:
    """``prompt`` (text or messages) + ``chosen``/``rejected`` (text, or messages ending with
    the assistant answer, as in the binarized UltraFeedback layout)."""
    missing = [c for c in ("chosen", "rejected") if c not in rows.column_names]
    if missing:
        raise TaskDataError(
            f"{source} [{split}]: a preference dataset needs the columns prompt (or chat "
            f"messages in chosen/rejected), chosen and rejected; missing {', '.join(missing)} "
            f"(columns: {', '.join(rows.column_names)})"
        )
    pairs = []
    for row, record in enumerate(rows):
        prompt_c, chosen = _split_answer(record["chosen"], source, split, row, "chosen")
        prompt_r, rejected = _split_answer(record["rejected"], source, split, row, "rejected")
        if prompt_c and prompt_r and prompt_c != prompt_r:
            raise row_error(
                source,
                split,
                row,
                "rejected",
                "its conversation before the answer differs "
                "from chosen's; both must answer the same prompt",
            )
        prompt = prompt_c or prompt_r or _prompt_messages(record.get("prompt"), source, split, row)
        if chosen == rejected:
            raise row_error(source, split, row, "chosen", "chosen and rejected are identical")
        pairs.append(PreferencePair(source, split, row, tuple(prompt), chosen, rejected))
    return pairs


def _split_answer(value, source: str, split: str, row: int, column: str):
    """(conversation before the answer, answer text) of a chosen/rejected cell."""
    if isinstance(value, str):
        prompt, answer = [], value
    elif isinstance(value, list) and value and isinstance(value[-1], dict):
        if value[-1].get("role") != "assistant":
            raise row_error(source, split, row, column, "the last message is not the assistant's")
        prompt = [{"role": m["role"], "content": m["content"]} for m in value[:-1]]
        answer = value[-1].get("content")
    else:
        raise row_error(source, split, row, column, "expected a string or a list of messages")
    if not isinstance(answer, str) or not answer.strip():
        raise row_error(source, split, row, column, "the answer is empty")
    return prompt, answer.strip()


def _prompt_messages(value, source: str, split: str, row: int) -> list[dict[str, str]]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value.strip()}]
    if isinstance(value, list) and value:
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise row_error(source, split, row, "prompt", "the prompt is empty")


def dataset_pairs(cfg: RunConfig) -> dict[str, list[PreferencePair]]:
    """{'train', 'validation'} pairs of ``dpo.dataset``; held out by test_split or by fraction."""
    pairs = load_preference_split(cfg, cfg.dpo.split)
    if cfg.dpo.test_split:
        held_out = load_preference_split(cfg, cfg.dpo.test_split)
    else:
        train_idx, val_idx = split_indices(
            [None] * len(pairs), cfg.data.validation_fraction, cfg.seed
        )
        pairs, held_out = [pairs[i] for i in train_idx], [pairs[i] for i in val_idx]
    return {"train": _cap(pairs, cfg.dpo.max_pairs, cfg.seed), "validation": held_out}


def _cap(pairs: list, limit: int | None, seed: int) -> list:
    if not limit or len(pairs) <= limit:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


# -- pairs from our classification and multiple-choice tasks ----------------------------------


def preference_tasks(cfg: RunConfig, tasks: list[TaskData]) -> list[TaskData]:
    """The tasks ``dpo.tasks`` names (default: every closed-answer task without a dataset)."""
    if cfg.dpo.tasks is None:
        return [] if cfg.dpo.dataset else [t for t in tasks if t.spec.kind in CLOSED_ANSWER_KINDS]
    by_name = {t.spec.name: t for t in tasks}
    chosen = []
    for name in cfg.dpo.tasks:
        if name not in by_name:
            raise TaskDataError(f"dpo.tasks names {name!r}, which is not a task of this config")
        if by_name[name].spec.kind not in CLOSED_ANSWER_KINDS:
            raise TaskDataError(
                f"dpo.tasks: task {name!r} is {by_name[name].spec.kind}; pairs can be built only "
                "from classification and multiple_choice tasks (use dpo.dataset otherwise)"
            )
        chosen.append(by_name[name])
    return chosen


def random_negative_pairs(task: TaskData, split: str, examples: list[Example], seed: int):
    """Chosen = gold, rejected = a uniformly drawn wrong label or choice letter."""
    rng = random.Random(f"{seed}-{task.spec.name}-{split}")
    pairs = []
    for example in examples:
        wrong = [c for c in example.candidates if c != example.answer]
        pairs.append(
            PreferencePair(
                task.spec.name,
                split,
                example.row,
                tuple(example.prompt_messages),
                example.answer,
                rng.choice(wrong),
                {"negative": "random"},
            )
        )
    return pairs


@torch.no_grad()
def candidate_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    cfg: RunConfig,
) -> list[list[float] | None]:
    """Per example, log p(candidate answer + end-of-turn | prompt) for every candidate.

    This is the quantity DPO trains, so the top wrong candidate is the hardest negative for it.
    None for an example whose candidates do not fit ``data.max_seq_len``. ``eval.batch_size``
    questions are scored per forward, each question's prompt once (``candidate_scores``).
    """
    template_kwargs = {"date_string": cfg.data.template_date}
    questions: list[list[TokenizedExample] | None] = []
    for example in examples:
        tokenized = [
            tokenize_example(
                _with_answer(example.prompt_messages, candidate, example),
                tokenizer,
                cfg.data.max_seq_len,
                template_kwargs,
            )
            for candidate in example.candidates
        ]
        # a str is the reason the example was dropped
        questions.append(None if any(isinstance(t, str) for t in tokenized) else tokenized)
    scorable = [q for q in questions if q is not None]
    size = cfg.eval.batch_size
    scores: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(scorable), size):
            scores += candidate_scores(
                model, scorable[start : start + size], tokenizer.pad_token_id
            )
    finally:
        model.train(was_training)
    found = iter(scores)
    return [None if q is None else next(found) for q in questions]


@torch.no_grad()
def candidate_scores(
    model, questions: list[list[TokenizedExample]], pad_id: int
) -> list[list[float]]:
    """Summed log p(answer | prompt) of each candidate of each question (``sequence_logprobs``'s
    figures to 1e-5), each question's prompt run once: the candidates differ only in their last
    few tokens (a banking77 candidate on SmolLM2 is about 145 tokens, 139 of them the prompt).

    Under sdpa or eager attention all ``questions`` run in one prefix-sharing forward
    (``dpo_step.grouped_logprobs``), the start the questions have in common (the instruction,
    the label list, the system block) once for all. flash-attention takes no such mask: there
    each question's prompt runs at batch 1 and its candidates continue from its KV cache
    (``evaluation.shared_prefix``). Under a process group every rank must call it in step, as
    mining does.
    """
    decoder, head = decoder_and_head(model)
    if uses_flash_attention(decoder):
        device = next(model.parameters()).device
        scores = []
        for candidates in questions:
            hidden, targets = labelled_rows_forward(decoder, candidates, pad_id, device, share=True)
            scores.append(token_logprobs(hidden, head, targets).sum(dim=1).tolist())
        return scores
    prompts = [worth_sharing(shared_prefix_length(candidates)) for candidates in questions]
    sums = grouped_logprobs(model, questions, prompts, pad_id).tolist()
    scores, start = [], 0
    for candidates in questions:
        scores.append(sums[start : start + len(candidates)])
        start += len(candidates)
    return scores


def mined_negative_pairs(
    model, tokenizer, task: TaskData, split: str, examples: list[Example], cfg: RunConfig
) -> tuple[list[PreferencePair], int]:
    """Chosen = gold, rejected = the model's highest-scoring wrong candidate.

    Returns the pairs and how many examples could not be scored (too long).
    """
    pairs, unscored = [], 0
    for example, scores in zip(examples, candidate_logprobs(model, tokenizer, examples, cfg)):
        if scores is None:
            unscored += 1
            continue
        wrong = [i for i, c in enumerate(example.candidates) if c != example.answer]
        top = max(wrong, key=lambda i: scores[i])
        gold = example.candidates.index(example.answer)
        pairs.append(
            PreferencePair(
                task.spec.name,
                split,
                example.row,
                tuple(example.prompt_messages),
                example.answer,
                example.candidates[top],
                {
                    "negative": "mined",
                    "chosen_logprob": scores[gold],
                    "rejected_logprob": scores[top],
                    "model_prefers_gold": scores[gold] > scores[top],
                },
            )
        )
    return pairs, unscored


def task_pairs(
    model, tokenizer, tasks: list[TaskData], cfg: RunConfig
) -> dict[str, list[PreferencePair]]:
    """{'train', 'validation'} pairs from the tasks' own splits (held out = validation)."""
    out: dict[str, list[PreferencePair]] = {"train": [], "validation": []}
    for task in tasks:
        for split in out:
            examples = task.examples[split]
            limit = cfg.dpo.max_pairs if split == "train" else cfg.eval.max_examples
            examples = _cap(examples, limit, cfg.seed)
            if cfg.dpo.negatives == "random":
                pairs = random_negative_pairs(task, split, examples, cfg.seed)
            else:
                pairs, unscored = mined_negative_pairs(model, tokenizer, task, split, examples, cfg)
                if unscored:
                    log.warning(
                        "task %s [%s]: %d examples too long to score their candidates; no pair",
                        task.spec.name,
                        split,
                        unscored,
                    )
            out[split] += pairs
    return out


def _with_answer(prompt: list[dict[str, str]], answer: str, like: Example | None = None) -> Example:
    messages = (*prompt, {"role": "assistant", "content": answer})
    return Example(
        task=like.task if like else "dpo",
        row=like.row if like else 0,
        messages=messages,
        answer=answer,
    )


# -- tokenization and the pairs file ----------------------------------------------------------


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, cfg: RunConfig
) -> tuple[list[TokenizedPair], Counter]:
    """Tokenize both answers of every pair with the SFT formatting; drops counted by reason.

    A pair is dropped when either answer does not fit ``data.max_seq_len`` even with the prompt
    cut (the answer itself is never cut, so no pair is trained on a truncated completion), or
    when both answers tokenize to the same ids. When the prompt must be cut, both answers get
    the same cut prompt (the longer answer sets the budget).
    """
    template_kwargs = {"date_string": cfg.data.template_date}

    def tokenize(answer: str, max_seq_len: int, index: int):
        example = _with_answer(list(pair.prompt), answer)
        return tokenize_example(example, tokenizer, max_seq_len, template_kwargs, 0, index)

    kept, dropped = [], Counter()
    for pair in pairs:
        sides = [tokenize(a, cfg.data.max_seq_len, len(kept)) for a in (pair.chosen, pair.rejected)]
        reasons = [s for s in sides if isinstance(s, str)]
        if reasons:
            dropped[reasons[0]] += 1
            continue
        chosen, rejected = sides
        if chosen.input_ids[: chosen.prompt_length] != rejected.input_ids[: rejected.prompt_length]:
            # The longer answer forced a deeper prompt cut; give the shorter one the same prompt
            # budget, so both answers are scored after the same prompt.
            answer_chosen = len(chosen.input_ids) - chosen.prompt_length
            answer_rejected = len(rejected.input_ids) - rejected.prompt_length
            budget = cfg.data.max_seq_len - abs(answer_chosen - answer_rejected)
            if answer_chosen < answer_rejected:
                chosen = tokenize(pair.chosen, budget, len(kept))
            else:
                rejected = tokenize(pair.rejected, budget, len(kept))
            if isinstance(chosen, str) or isinstance(rejected, str):
                dropped["prompt_too_long"] += 1
                continue
        if chosen.input_ids == rejected.input_ids:
            dropped["identical_tokens"] += 1
        else:
            kept.append(TokenizedPair(chosen, rejected, len(kept)))
    return kept, dropped


def write_pairs(path: Path, pairs: dict[str, list[PreferencePair]]) -> None:
    """One JSON object a line, for inspection: source, split, row, prompt, chosen, rejected."""
    with path.open("w") as handle:
        for split_pairs in pairs.values():
            for pair in split_pairs:
                handle.write(json.dumps(pair.record()) + "\n")

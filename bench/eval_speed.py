"""Evaluation speed per task kind on the demo data, and one-pass multiple choice vs generation.

Builds the demo's model (the built-in tiny model, micro, with the demo's LoRA config) and data
(configs/demo.yaml), and times every scorer `multitune eval` uses on the validation split, with
the demo's evaluation batch size:

- classification (banking77: 77 labels, text_claims: 2): constrained label decoding;
- multiple choice (commonsense_qa): the choice letters from one forward pass per question, the
  choice texts by length-normalised log-likelihood (5 rows per question), and, as the plain
  baseline, generating the letter with the same batched greedy decoder (max 2 new tokens: the
  letter and the end-of-turn token; an untrained model never stops early);
- qa and chat, which the demo has no data for: commonsense_qa's questions answered by the
  letter as free text (qa), and banking77's texts answered by the intent as a chat: batched
  greedy generation up to eval.max_new_tokens.

Every scorer runs once to warm up, then ``--repeats`` rounds time each scorer in turn; the
fastest run of each counts. Prints one table and the speed-up of one-pass letter scoring over
letter generation.

Run: .venv/bin/python bench/eval_speed.py [--threads 1] [--max-examples 128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(max_examples: int, max_new_tokens: int, workdir: Path):
    from multitune.config.loader import load_config
    from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
    from multitune.models.loading import load_model_and_tokenizer, pick_device
    from multitune.models.lora import apply_lora
    from multitune.training.state import seed_everything

    chat_path = workdir / "chat" / "train.jsonl"
    chat_path.parent.mkdir(parents=True)
    import datasets

    banking = datasets.Dataset.from_parquet(str(REPO / "data/sample/banking77/train.parquet"))
    intent = banking.features["label"].int2str
    rows = [{"text": r["text"], "label": intent(r["label"])} for r in banking]
    chat_path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": row["text"]},
                        {"role": "assistant", "content": f"That is about {row['label']}."},
                    ]
                }
            )
            + "\n"
            for row in rows[:500]
        )
    )
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"output_dir={workdir / 'run'}",
            f"eval.max_examples={max_examples}",
            f"eval.max_new_tokens={max_new_tokens}",
        ],
    )
    data = cfg.model_dump()
    data["tasks"] += [
        {
            "name": "csqa_as_qa",
            "dataset": str(REPO / "data/sample/commonsense_qa"),
            "kind": "qa",
            "columns": {"question": "question", "answer": "answerKey"},
        },
        {"name": "banking_chat", "dataset": str(chat_path.parent), "kind": "chat"},
    ]
    from multitune.config import validate_config

    cfg = validate_config(data)
    seed_everything(cfg.seed)
    tasks = load_tasks(cfg, include_test=False)
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, training_corpus(tasks), cfg.seed, pick_device()
    )
    tokenize_tasks(tasks, tokenizer, cfg)
    model = apply_lora(model, cfg.lora).eval()
    return cfg, tasks, model, tokenizer


def scorers(cfg, tasks, model, tokenizer):
    """(task, kind, method, number of examples, zero-argument scoring function)."""
    from multitune.evaluation.scoring import (
        choice_letters,
        choice_text_scores,
        constrained_labels,
        end_of_turn_id,
        greedy_generate,
        label_trie,
    )

    batch, pad_id = cfg.eval.batch_size, tokenizer.pad_token_id
    end_id = end_of_turn_id(tokenizer, {"date_string": cfg.data.template_date})
    out = []
    for task in tasks:
        examples = task.tokenized["validation"][: cfg.eval.max_examples]
        source = task.examples["validation"]
        name, kind = task.spec.name, task.spec.kind
        if kind == "classification":
            trie = label_trie(tokenizer, task.spec.label_names, end_id)
            out.append(
                (
                    name,
                    kind,
                    "constrained label decoding",
                    len(examples),
                    partial(constrained_labels, model, examples, trie, batch, pad_id),
                )
            )
        elif kind == "multiple_choice":
            letters = {e.example_index: source[e.example_index].candidates for e in examples}
            texts = {e.example_index: source[e.example_index].choice_texts for e in examples}
            out += [
                (
                    name,
                    kind,
                    "letters, one forward pass",
                    len(examples),
                    partial(choice_letters, model, examples, letters, tokenizer, batch, pad_id),
                ),
                (
                    name,
                    kind,
                    "choice texts, mean log-prob",
                    len(examples),
                    partial(choice_text_scores, model, examples, texts, tokenizer, batch, pad_id),
                ),
                (
                    name,
                    kind,
                    "baseline: generate the letter",
                    len(examples),
                    partial(greedy_generate, model, examples, tokenizer, end_id, batch, 2),
                ),
            ]
        else:
            out.append(
                (
                    name,
                    kind,
                    f"greedy generation, <= {cfg.eval.max_new_tokens} tokens",
                    len(examples),
                    partial(
                        greedy_generate,
                        model,
                        examples,
                        tokenizer,
                        end_id,
                        batch,
                        cfg.eval.max_new_tokens,
                    ),
                )
            )
    return out


def fastest_round_robin(fns: list, repeats: int) -> list[float]:
    """The fastest of ``repeats`` timings of each function, measured in turns.

    One warm-up call each (first-call allocations), then every round times every function once,
    so load from other processes on a shared machine falls on all of them alike.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-examples", type=int, default=128, help="per task")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="qa and chat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, tasks, model, tokenizer = build(args.max_examples, args.max_new_tokens, Path(tmp))
        measured = scorers(cfg, tasks, model, tokenizer)
        times = fastest_round_robin([fn for *_, fn in measured], args.repeats)
        rows = [(*row[:4], seconds) for row, seconds in zip(measured, times)]

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), eval.batch_size "
        f"{cfg.eval.batch_size}, tiny model '{cfg.model.tiny.size}', best of {args.repeats}"
    )
    print()
    print("| task | kind | method | examples | seconds | examples/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, kind, method, n, seconds in rows:
        print(f"| {name} | {kind} | {method} | {n} | {seconds:.3f} | {n / seconds:.1f} |")
    mc = {method: seconds for _, kind, method, _, seconds in rows if kind == "multiple_choice"}
    one_pass = mc["letters, one forward pass"]
    generated = mc["baseline: generate the letter"]
    print()
    print(
        f"multiple choice: one-pass letter scoring {generated / one_pass:.2f}x the speed of "
        f"generating the letter ({one_pass:.3f} s vs {generated:.3f} s); choice-text scoring "
        f"takes {mc['choice texts, mean log-prob'] / one_pass:.2f}x the one-pass time"
    )


if __name__ == "__main__":
    main()

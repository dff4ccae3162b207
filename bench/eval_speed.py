"""Evaluation cost per task kind on the demo's real model: where the time of an evaluation goes.

Builds the demo's model (configs/demo.yaml: SmolLM2-135M-Instruct unless ``--config`` names
another, with the demo's LoRA config, untrained) and data, plus commonsense_qa answered by letter
and two generated kinds the demo has no data for (qa: commonsense_qa's questions answered by the
letter as free text; chat: banking77's texts answered by a sentence naming the intent). For each
task it times, on the validation split with the demo's evaluation batch size:

- the answer-loss pass alone (one forward over prompt + gold answer, the fused loss op, every
  row whole as in training);
- the whole per-task evaluation `multitune eval` runs (loss, predictions, metrics);
- the same evaluation without the shared prompt prefix (``share_prefix=False``: every row runs
  its whole prompt), beside it the mean prefix the batches share (tokens) and the speed-up.

Constrained decoding (classification, multiple choice by text) reads the gold answers in the
same forward as the prompts and stops as soon as every row can only become one label, so its
evaluation should cost about one loss pass: the ratio column shows it. Every measurement runs
once to warm up, then ``--repeats`` rounds time each in turn; the fastest of each counts.
Predictions are the same either way (tests/unit/test_shared_prefix.py); only the time differs.

The last line sums the config's own tasks (the demo's three): ``demo tasks: evaluation
with shared prefixes R.RRx the examples/s without``.

Run: .venv/bin/python bench/eval_speed.py [--threads 2] [--max-examples 64]
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


def build(config: Path, max_examples: int, max_new_tokens: int, workdir: Path):
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
        config,
        [
            f"output_dir={workdir / 'run'}",
            f"eval.max_examples={max_examples}",
            f"eval.max_new_tokens={max_new_tokens}",
        ],
    )
    data = cfg.model_dump()
    csqa = str(REPO / "data/sample/commonsense_qa")
    data["tasks"] += [
        {
            "name": "csqa_letter",
            "preset": "commonsense_qa",
            "dataset": csqa,
            "answer_format": "letter",
        },
        {
            "name": "csqa_as_qa",
            "dataset": csqa,
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


def mean_shared_prefix(examples, batch_size: int) -> float:
    """Prompt tokens the evaluation batches run once instead of once per row (mean over the
    batches with more than one row; 0 where sharing does not pay, as the scorers decide)."""
    from multitune.evaluation.scoring import by_length
    from multitune.evaluation.shared_prefix import MIN_SHARED_TOKENS, shared_prefix_length

    lengths = []
    for batch in by_length(examples, batch_size):
        if len(batch) > 1:
            shared = shared_prefix_length([e.input_ids[: e.prompt_length] for e in batch])
            lengths.append(shared if shared >= MIN_SHARED_TOKENS else 0)
    return sum(lengths) / max(len(lengths), 1)


def measurements(cfg, tasks, model, tokenizer):
    """Per task: (task, kind, examples, mean tokens, mean shared prefix, loss pass, evaluation,
    evaluation without the shared prefix) callables."""
    from multitune.evaluation.runner import evaluate_tasks
    from multitune.evaluation.scoring import answer_loss

    out = []
    for task in tasks:
        examples = task.tokenized["validation"][: cfg.eval.max_examples]
        kind = task.spec.kind
        if kind == "multiple_choice":
            kind += f" ({task.spec.answer_format})"
        tokens = sum(len(e.input_ids) for e in examples) / len(examples)
        # The plain loss pass, as training runs it: every row whole.
        loss = partial(
            answer_loss, model, examples, cfg.eval.batch_size, tokenizer.pad_token_id, False
        )
        whole = partial(evaluate_tasks, model, tokenizer, [task], cfg)
        unshared = partial(evaluate_tasks, model, tokenizer, [task], cfg, share_prefix=False)
        # Multiple choice by letter also scores the choice texts, in batches of about
        # batch_size choice rows; the prefix column shows the prompts' batches.
        shared = mean_shared_prefix(examples, cfg.eval.batch_size)
        out.append((task.spec.name, kind, len(examples), tokens, shared, loss, whole, unshared))
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
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-examples", type=int, default=64, help="per task")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="qa and chat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, tasks, model, tokenizer = build(
            args.config, args.max_examples, args.max_new_tokens, Path(tmp)
        )
        measured = measurements(cfg, tasks, model, tokenizer)
        fns = [fn for row in measured for fn in row[5:]]
        times = fastest_round_robin(fns, args.repeats)

    from multitune.config.loader import load_config

    demo = {t.name for t in load_config(args.config).tasks}
    print(
        f"{cfg.model.name}, torch {torch.__version__}, {args.threads} thread(s), "
        f"eval.batch_size {cfg.eval.batch_size}, best of {args.repeats}"
    )
    print()
    print(
        "| task | kind | examples | tokens/example | shared prefix tokens | loss pass s | "
        "evaluation s | examples/s | evaluation / loss pass | unshared evaluation s | "
        "unshared examples/s | speed-up from sharing |"
    )
    print("| --- " * 12 + "|")
    rows = list(zip(measured, times[0::3], times[1::3], times[2::3]))
    for (name, kind, n, tokens, shared, *_), loss_s, eval_s, unshared_s in rows:
        print(
            f"| {name} | {kind} | {n} | {tokens:.0f} | {shared:.0f} | {loss_s:.2f} | "
            f"{eval_s:.2f} | {n / eval_s:.1f} | {eval_s / loss_s:.2f} | {unshared_s:.2f} | "
            f"{n / unshared_s:.1f} | {unshared_s / eval_s:.2f} |"
        )
    ours = [(row[0][2], row[2], row[3]) for row in rows if row[0][0] in demo]
    shared_rate = sum(n for n, _, _ in ours) / sum(s for _, s, _ in ours)
    unshared_rate = sum(n for n, _, _ in ours) / sum(u for _, _, u in ours)
    print()
    print(
        f"demo tasks: evaluation with shared prefixes {shared_rate / unshared_rate:.2f}x the "
        "examples/s without"
    )


if __name__ == "__main__":
    main()

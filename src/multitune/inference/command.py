"""``multitune predict`` and ``multitune chat``: arguments and the functions they call."""

from __future__ import annotations

import argparse
from pathlib import Path

RUN_HELP = "output folder of a `multitune train` run, or a `multitune export --merged` folder"


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help=RUN_HELP)
    parser.add_argument("--input", type=Path, required=True, help="JSONL rows: messages or prompt")
    parser.add_argument("--output", type=Path, required=True, help="JSONL: each row + prediction")
    parser.add_argument(
        "--task", help="rows are in this task's dataset schema; format and score them as in eval"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-new-tokens", type=int, help="generation cap (default: the run's eval value)"
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from multitune.inference.loading import load_for_inference
    from multitune.inference.predict import run_predict

    loaded = load_for_inference(args.output_dir)
    count = run_predict(
        loaded, args.input, args.output, args.task, args.batch_size, args.max_new_tokens
    )
    print(f"{count} predictions written to {args.output}")
    return 0


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help=RUN_HELP)
    parser.add_argument("--system", help="a system prompt for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256)


def cmd_chat(args: argparse.Namespace) -> int:
    from multitune.inference.chat import chat_loop
    from multitune.inference.loading import load_for_inference

    chat_loop(load_for_inference(args.output_dir), args.max_new_tokens, args.system)
    return 0

"""``multitune plan``: the arguments, and the function the CLI calls.

Light to import (the CLI builds its parser from it); torch, transformers and peft load only when
a plan is made.
"""

from __future__ import annotations

import argparse
import json
import logging

from multitune.config import load_config
from multitune.planning.hardware import ACCELERATOR_NAMES
from multitune.planning.throughput import DEFAULT_MFU

log = logging.getLogger(__name__)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpu-type", choices=ACCELERATOR_NAMES, default="h100", help="default h100"
    )
    parser.add_argument("--price-per-gpu-hour", type=float, default=None, metavar="USD")
    parser.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"assumed model FLOPs utilisation ({DEFAULT_MFU})",
    )
    parser.add_argument(
        "--num-tokens",
        type=int,
        default=None,
        help="training tokens per epoch; default: load and tokenize the data (cached)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan(args: argparse.Namespace) -> int:
    from multitune.planning.plan import build_plan, format_plan
    from multitune.planning.tokens import count_dataset_tokens

    cfg = load_config(args.config, args.overrides)
    num_tokens, num_examples, num_answer_tokens = args.num_tokens, None, None
    num_example_tokens = None
    count_error = None
    if num_tokens is None:
        try:
            counts = count_dataset_tokens(cfg)
            num_tokens, num_examples = counts["num_tokens"], counts["num_examples"]
            num_answer_tokens = counts["num_answer_tokens"]
            num_example_tokens = counts["num_example_tokens"]
        except (ValueError, RuntimeError, OSError) as exc:
            # The memory plan stands without the data; say why time and cost are missing.
            count_error = f"could not count the training tokens: {exc}"
            log.warning(count_error)
    plan = build_plan(
        cfg,
        gpus=args.gpus,
        gpu_type=args.gpu_type,
        price_per_gpu_hour=args.price_per_gpu_hour,
        num_tokens=num_tokens,
        nodes=args.nodes,
        mfu=args.mfu,
        num_examples=num_examples,
        num_answer_tokens=num_answer_tokens,
        num_example_tokens=num_example_tokens,
    )
    if count_error:
        plan["notes"].append(count_error)
    elif num_examples is not None:
        share = counts["num_answer_tokens"] / max(1, counts["num_tokens"])
        plan["notes"].append(
            f"answer tokens are {share:.1%} of the training tokens; the SFT loss projects only "
            "those onto the vocabulary (the loss line counts them), and a packed micro-batch "
            f"fills {plan['batch']['positions_per_micro_batch']:,} positions (rows x width)"
        )
        saved = counts["num_example_tokens"] - counts["num_tokens"]
        if saved:
            plan["notes"].append(
                f"data.share_prefix: shared prompt prefixes computed once per micro-batch save "
                f"{saved:,} of {counts['num_example_tokens']:,} tokens per epoch "
                f"({saved / counts['num_example_tokens']:.1%}); the times count the rest"
            )
    print(
        json.dumps(plan, indent=2) if args.json else format_plan(plan),
        end="\n" if args.json else "",
    )
    return 0

"""Command line: each command maps onto one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from multitune.config.loader import ConfigError, dump_config, load_config
from multitune.distributed.launch import add_launch_arguments, cmd_launch
from multitune.doctor import cmd_doctor
from multitune.export.command import add_export_arguments, cmd_export
from multitune.hub.command import add_push_arguments, cmd_push
from multitune.inference.command import (
    add_chat_arguments,
    add_predict_arguments,
    cmd_chat,
    cmd_predict,
)
from multitune.planning import add_plan_arguments, cmd_plan
from multitune.preflight.command import cmd_preflight


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 seed=3"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitune", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune on every task of a config, then evaluate")
    _config_args(train)
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    dpo = commands.add_parser("dpo", help="DPO from an SFT adapter, then evaluate")
    _config_args(dpo)
    dpo.add_argument("--adapter", type=Path, required=True, help="the SFT adapter folder")

    validate = commands.add_parser("validate", help="check a config without loading a model")
    _config_args(validate)

    evaluate = commands.add_parser("eval", help="score the base model or an adapter per task")
    _config_args(evaluate)
    evaluate.add_argument(
        "--adapter", type=Path, help="a PEFT adapter folder (default: base model)"
    )
    evaluate.add_argument("--split", choices=["validation", "test"], default="validation")

    plan = commands.add_parser(
        "plan", help="estimate memory, strategy, time and cost before renting GPUs"
    )
    _config_args(plan)
    add_plan_arguments(plan)

    preflight = commands.add_parser(
        "preflight", help="check hub access, tokens, disk and launch before loading anything"
    )
    _config_args(preflight)

    launch = commands.add_parser(
        "launch", help="run `train` under torchrun on this node (SLURM, runpod or one node)"
    )
    add_launch_arguments(launch)

    export = commands.add_parser("export", help="merge the adapter into its base and/or write GGUF")
    add_export_arguments(export)

    commands.add_parser(
        "doctor", help="versions, device, C++ ops or their fallback (and why), flash-attn"
    )
    push = commands.add_parser("push", help="upload a run's adapter (or merged model) to the Hub")
    add_push_arguments(push)

    predict = commands.add_parser("predict", help="batch inference over a JSONL file")
    add_predict_arguments(predict)

    chat = commands.add_parser("chat", help="talk to a trained model, tokens streamed")
    add_chat_arguments(chat)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    from multitune.recipes import sft  # heavy imports only when training

    if "dpo" not in cfg.stages:
        sft.run(cfg)
        return 0
    from multitune.distributed.process_group import (
        any_rank,
        destroy_distributed,
        init_distributed,
    )
    from multitune.recipes import dpo

    # Both stages in one process group: under plain torchrun (its agent's shared rendezvous
    # store) a second group cannot be started after the first is destroyed.
    ctx = init_distributed(cfg.distributed)
    try:
        results = sft.run(cfg, ctx)
        # {} = stopped by a signal (resume SFT first), or a rank > 0: rank 0 decides for all.
        if any_rank(ctx, bool(results))[0]:
            dpo.run(cfg, Path(cfg.output_dir) / "adapter", previous=results, ctx=ctx)
    finally:
        destroy_distributed(ctx)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from multitune.recipes import dpo

    dpo.run(cfg, args.adapter)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from multitune.recipes import evaluate

    evaluate.run(cfg, args.adapter, args.split)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    names = ", ".join(f"{t.name} ({t.kind})" for t in cfg.tasks)
    print(f"{args.config}: valid; model {cfg.model.name}; tasks: {names}")
    return 0


def _quiet_library_progress_bars() -> None:
    """datasets/transformers draw a bar per file and split; our own logs say what happens."""
    import datasets
    import transformers

    # peft calls a property transformers 5 deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


COMMANDS = {
    "train": cmd_train,
    "dpo": cmd_dpo,
    "validate": cmd_validate,
    "eval": cmd_eval,
    "plan": cmd_plan,
    "preflight": cmd_preflight,
    "launch": cmd_launch,
    "export": cmd_export,
    "doctor": cmd_doctor,
    "push": cmd_push,
    "predict": cmd_predict,
    "chat": cmd_chat,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`eval CONFIG --adapter A key=value`), which argparse's
    # positional `nargs="*"` alone does not accept.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        _quiet_library_progress_bars()
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

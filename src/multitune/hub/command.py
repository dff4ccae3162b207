"""``multitune push OUTPUT_DIR --repo user/name [--private] [--merged]``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help="output folder of a `multitune train` run")
    parser.add_argument("--repo", required=True, help="Hub model repo, user/name (created if new)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--merged",
        action="store_true",
        help="push the base model with the adapter merged in, instead of the adapter",
    )


def cmd_push(args: argparse.Namespace) -> int:
    """Check token and access first, then upload the run (adapter or merged model) with its card."""
    from multitune.hub.checks import check_write_access, require_token
    from multitune.hub.push import push_run

    check_write_access(args.repo, require_token("push"))
    print(
        f"pushed: {push_run(args.output_dir, args.repo, private=args.private, merged=args.merged)}"
    )
    return 0

"""`multitune preflight CONFIG`: run every applicable check and list all failures."""

from __future__ import annotations

import argparse

from multitune.config.loader import load_config


def cmd_preflight(args: argparse.Namespace) -> int:
    from multitune.preflight.registry import PreflightError, run_preflight

    cfg = load_config(args.config, args.overrides)
    failures = run_preflight(cfg)
    if failures:
        raise PreflightError(failures)
    print(f"{args.config}: preflight passed")
    return 0

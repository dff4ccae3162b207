"""bench/prefix_sharing.py in a short CPU mode on the tiny demo: training and DPO steps, each
with and without shared prefixes, DPO mining per question and in batches, and the ratio line. The ratios are benchmark figures, not
asserted; that the shared layout computes fewer tokens is."""

import os
import re
import subprocess
import sys

import pytest
from tests.conftest import REPO

RATIO_LINE = re.compile(r"^share_prefix: throughput ratio \d+\.\d\dx$")


def run_bench(*extra: str) -> list[str]:
    proc = subprocess.run(
        [
            sys.executable,
            "bench/prefix_sharing.py",
            "--config",
            "configs/demo-tiny.yaml",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            *extra,
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_training_steps_compute_fewer_tokens_shared_and_print_the_ratio_line():
    lines = run_bench()
    assert RATIO_LINE.match(lines[-1]), lines[-1]
    computed = {
        line.split()[0]: int(line.split()[1].replace(",", ""))
        for line in lines
        if line.startswith(("shared  ", "unshared  "))
    }
    assert 0 < computed["shared"] < computed["unshared"]


@pytest.mark.slow
def test_dpo_steps_print_the_ratio_line():
    lines = run_bench("--dpo")
    assert RATIO_LINE.match(lines[-1]), lines[-1]
    pairs = next(line for line in lines if line.startswith("DPO pairs:"))
    assert float(pairs.rsplit(" ", 1)[1]) > 16  # the tiny demo's prompts are mostly shared


@pytest.mark.slow
def test_mining_prints_the_ratio_line_with_the_same_scores_both_ways():
    lines = run_bench("--mining", "--questions", "6")
    assert RATIO_LINE.match(lines[-1]), lines[-1]
    within = [float(line.rsplit(" ", 1)[1]) for line in lines if "scores within" in line]
    assert len(within) == 3 and max(within) < 1e-4

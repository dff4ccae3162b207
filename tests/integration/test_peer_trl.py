"""bench/peer_trl.py in its short CPU mode: both sides train the same examples and it prints
the ratio line. The ratios themselves are benchmark figures, not asserted."""

import os
import re
import subprocess
import sys

import pytest
from tests.conftest import REPO

RATIO_LINE = re.compile(r"^vs TRL: throughput ratio \d+\.\d\dx, peak memory ratio \d+\.\d\dx$")


@pytest.mark.slow
def test_peer_benchmark_trains_the_same_examples_on_both_sides_and_prints_the_ratio_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "bench/peer_trl.py",
            "--model",
            "builtin:tiny-llama",
            "--tiny-size",
            "nano",
            "--steps",
            "2",
            "--micro-batch",
            "4",
            "--max-examples",
            "40",
            "--threads",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert RATIO_LINE.match(lines[-1]), lines[-1]
    rows = {
        line.split()[0]: line.split() for line in lines if line.split()[0] in ("trl", "multitune")
    }
    # side, examples, non-pad tokens, ...: both sides trained 2 steps x 4 examples.
    assert rows["trl"][1] == rows["multitune"][1] == "8"
    assert int(rows["trl"][2]) > 0 and int(rows["multitune"][2]) > 0

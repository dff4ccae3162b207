"""`multitune doctor` says which path the ops take, and why when it is the fallback."""

import os
import re
import subprocess
import sys

import torch
import transformers
from tests.conftest import REPO

from multitune import ops
from multitune.cli import main


def test_doctor_prints_versions_device_and_the_active_ops_path(capsys):
    assert main(["doctor"]) == 0
    lines = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()
    )
    assert lines["torch"] == torch.__version__
    assert lines["transformers"] == transformers.__version__
    assert lines["device"].startswith("cuda" if torch.cuda.is_available() else "cpu (")
    assert lines["flash-attn"].startswith(("not installed", "installed"))
    if ops.active_backend() == "cpp":
        assert lines["C++ ops"].startswith("active (compiled extension")
    else:
        assert lines["C++ ops"].startswith("FALLBACK to the PyTorch reference: ")


def test_doctor_names_the_fallback_and_its_reason():
    env = {**os.environ, "MULTITUNE_DISABLE_CPP": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "multitune", "doctor"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "C++ ops       FALLBACK to the PyTorch reference: disabled by MULTITUNE_DISABLE_CPP=1"
        in proc.stdout
    )

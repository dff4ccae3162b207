"""Shared fixtures: the bundled sample data, a small run config, the tiny tokenizer."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MULTITUNE_CACHE" not in os.environ:
    # GGUF conversions (SmolLM2: about 20 s) happen once per test session, in a folder of its own
    # that subprocesses (CLI runs, torchrun workers) inherit, and that goes with the session.
    os.environ["MULTITUNE_CACHE"] = tempfile.mkdtemp(prefix="multitune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MULTITUNE_CACHE"], True)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}
SMOLLM2 = "builtin:smollm2-135m-instruct"


def small_config_dict(output_dir: Path, max_examples: int = 60) -> dict:
    """The demo's three tasks, cut down so a run takes seconds."""
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": "builtin:tiny-llama", "tiny": {"size": "nano"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "tasks": [
            {
                "preset": "banking77",
                "dataset": str(SAMPLE / "banking77"),
                "max_examples": max_examples,
            },
            {
                "preset": "commonsense_qa",
                "dataset": str(SAMPLE / "commonsense_qa"),
                "max_examples": max_examples,
            },
            {
                "preset": "text_claims",
                "dataset": str(SAMPLE / "text_claims"),
                "max_examples": max_examples,
            },
        ],
        "data": {"max_seq_len": 160},
        "train": {"epochs": 1, "lr": 3e-3, "micro_batch_size": 8, "progress_bar": False},
        "eval": {"batch_size": 32, "max_examples": 24},
    }


@pytest.fixture
def small_config(tmp_path):
    from multitune.config import validate_config

    return validate_config(small_config_dict(tmp_path / "run"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from multitune.models.tiny import train_tiny_tokenizer

    corpus = [p.read_text() for p in sorted(SAMPLE.rglob("*.csv"))]
    corpus += [
        "Classify the text. Answer with one of: card_arrival, card_linking, Claim, Not a Claim"
    ]
    corpus += ["Where would you keep the milk? A. fridge B. garage C. oven"] * 5
    return train_tiny_tokenizer(corpus, 600)


@pytest.fixture(scope="session")
def smollm2():
    """The real pretrained SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer."""
    import torch

    from multitune.config.schema import ModelConfig
    from multitune.models.loading import load_model_and_tokenizer

    cfg = ModelConfig(name=SMOLLM2, dtype="float32")
    model, tokenizer = load_model_and_tokenizer(cfg, [], 0, torch.device("cpu"))
    return model.eval(), tokenizer


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

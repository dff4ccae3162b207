"""The demo config, shortened, through the real CLI in a fresh process: every output appears."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from tests.conftest import REPO

from multitune.checkpoint import verify_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "multitune", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_config_runs_end_to_end_and_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    overrides = [
        f"output_dir={out}",
        "train.max_steps=6",
        "model.tiny.size=nano",
        "eval.max_examples=16",
        "tasks.0.max_examples=60",
        "tasks.1.max_examples=60",
        "tasks.2.max_examples=60",
    ]
    proc = run_cli("train", "configs/demo-tiny.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The per-task table.
    assert "per-task results on validation" in proc.stdout
    for name in ("banking77", "commonsense_qa", "text_claims"):
        assert name in proc.stdout

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 6 and config["output_dir"] == str(out)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in train] == [6] and [r["step"] for r in validation] == [6]
    for record in records:
        assert {"step", "epoch", "split", "loss", "lr", "tokens_per_s"} <= set(record)
        for name in ("banking77", "commonsense_qa", "text_claims"):
            assert f"task/{name}/loss" in record

    results = json.loads((out / "eval_results.json").read_text())
    assert results["split"] == "validation" and results["adapter"] == "adapter"
    for name in ("banking77", "commonsense_qa", "text_claims"):
        metrics = results["tasks"][name]
        report = json.loads((out / "data_report.json").read_text())[name]
        assert metrics["n"] == report["tokenized"]["validation"] >= 10
        assert metrics["perplexity"] > 1
        assert 0 <= metrics["accuracy"] <= 1
        assert set(results["base"]["tasks"][name]) >= {"n", "loss", "accuracy"}
    assert results["chance"]["commonsense_qa"] == pytest.approx(0.2)

    report = json.loads((out / "data_report.json").read_text())
    assert report["banking77"]["rows_loaded"] == {"train": 1000, "test": 250}
    assert (
        report["banking77"]["examples"]["train"] + report["banking77"]["examples"]["validation"]
        == 60
    )
    assert report["text_claims"]["dropped"] == {} and report["text_claims"]["truncated"] == {}

    # The demo trains embed_tokens, tied to lm_head; it still checkpoints (the final step).
    assert verify_checkpoint(out / "checkpoints" / "step-00000006") == []

    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()

    # `multitune eval` on the saved adapter reproduces the training run's final evaluation.
    again = tmp_path / "eval"
    proc = run_cli(
        "eval",
        "configs/demo-tiny.yaml",
        "--adapter",
        str(adapter),
        *overrides[1:],
        f"output_dir={again}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rescored = json.loads((again / "eval_results.json").read_text())
    assert rescored["split"] == "validation" and rescored["adapter"] == str(adapter)
    for name, metrics in results["tasks"].items():
        assert rescored["tasks"][name]["accuracy"] == metrics["accuracy"]
        assert rescored["tasks"][name]["loss"] == pytest.approx(metrics["loss"], rel=1e-5)

    # The test split: text_claims has none on the hub, which is an error, not a zero metric.
    proc = run_cli(
        "eval",
        "configs/demo-tiny.yaml",
        "--split",
        "test",
        *overrides[1:],
        f"output_dir={again}",
    )
    assert proc.returncode == 2
    assert "task 'text_claims' has no 'test' split to evaluate (set test_split)" in proc.stderr


@pytest.mark.slow
def test_demo_fine_tuned_adapter_beats_the_base_model_on_every_task(tmp_path, monkeypatch):
    """The demo cut to 650 of its 2,700 rows (mostly banking77, the hardest of the three to
    learn) and 3 epochs: about 100 steps instead of the demo's 680.

    Every task's answer loss falls far below the base model's and both classification tasks
    gain accuracy (seeds 0 and 1: banking77 0.125 -> 0.25 and 0.06 -> 0.15, text_claims 0.45 ->
    0.55 and 0.5 -> 0.7). So short a run is not enough to reach the full demo's accuracy
    (README); "far above chance" is the full demo's figure, not checked here. Multiple choice is
    held to its loss: the demo's model does not learn to point at the right letter (README,
    known gap), so its accuracy stays near chance either way.
    """
    from multitune.config import load_config
    from multitune.recipes import sft

    monkeypatch.chdir(REPO)  # the demo's datasets are paths relative to the checkout
    cfg = load_config(
        REPO / "configs" / "demo-tiny.yaml",
        [
            f"output_dir={tmp_path / 'demo'}",
            "tasks.0.max_examples=500",
            "tasks.1.max_examples=50",
            "tasks.2.max_examples=100",
            "train.epochs=3",
            "train.progress_bar=false",
            "eval.max_examples=48",
        ],
    )
    results = sft.run(cfg)
    after, before = results["tasks"], results["base"]["tasks"]
    for name in ("banking77", "commonsense_qa", "text_claims"):
        assert after[name]["loss"] < before[name]["loss"] / 10, name
    for name in ("banking77", "text_claims"):
        assert after[name]["accuracy"] > before[name]["accuracy"], name

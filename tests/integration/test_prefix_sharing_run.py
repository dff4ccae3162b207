"""A training run with data.share_prefix on logs the losses and reports the prefixes of the same
run with it off."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import small_config_dict

from multitune.config import validate_config


def train_losses(output_dir: Path) -> list[dict[str, float]]:
    """Per logged step: the loss, each task's loss and the gradient norm."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.endswith("}")]
    return [
        {k: v for k, v in r.items() if k in ("loss", "grad_norm") or k.startswith("task/")}
        for r in records
        if r["split"] == "train"
    ]


def test_run_with_shared_prefixes_matches_the_unshared_run(tmp_path):
    from multitune.recipes import sft

    def run(share_prefix) -> Path:
        data = small_config_dict(tmp_path / str(share_prefix), max_examples=10)
        data["data"]["share_prefix"] = share_prefix
        data["train"].update({"max_steps": 3, "micro_batch_size": 4, "log_every_steps": 1})
        data["eval"].update({"before_training": False, "max_examples": 2})
        sft.run(validate_config(data))
        return Path(data["output_dir"])

    shared, unshared = run(True), run(False)

    losses = train_losses(shared)
    assert len(losses) == 3
    for step, reference in zip(losses, train_losses(unshared)):
        assert step.keys() == reference.keys() and len(step) == 5
        for key, value in reference.items():
            assert abs(step[key] - value) <= 1e-5 * abs(value), (key, step[key], value)
    report = json.loads((shared / "data_report.json").read_text())
    off = json.loads((unshared / "data_report.json").read_text())
    for name, task in report.items():
        prefix = task["shared_prefix"]
        # Tiny tokenizer, Llama 3 template: the system block and at least the markup after it.
        assert prefix["tokens"] > 20 and prefix["mean_suffix_tokens"] > 0
        assert prefix["computed_once"] and not off[name]["shared_prefix"]["computed_once"]
        assert off[name]["shared_prefix"]["tokens"] == prefix["tokens"]

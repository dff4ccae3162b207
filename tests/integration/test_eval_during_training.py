"""Evaluation during training: every metric in metrics.jsonl and the best adapter in best/."""

import json

import pytest
import torch
from peft import PeftModel
from tests.conftest import small_config_dict
from transformers import AutoModelForCausalLM

from multitune.config import ConfigError, validate_config
from multitune.evaluation.validation import BestCheckpoint
from multitune.recipes import sft

EXPECTED_METRICS = {
    "banking77": {"loss", "perplexity", "accuracy", "macro_f1", "mcc"},
    "commonsense_qa": {"loss", "perplexity", "accuracy", "text_accuracy"},
    "text_claims": {"loss", "perplexity", "accuracy", "macro_f1", "mcc", "f1"},
}


def run_config(out, **train):
    data = small_config_dict(out, max_examples=40)
    # Constant lr and no warmup: a run cut at step N trains exactly like the first N steps of a
    # longer one, so it reproduces the adapter a longer run had at step N.
    data["train"].update({"scheduler": "constant", "warmup_ratio": 0.0, **train})
    data["eval"].update({"max_examples": 8, "before_training": False})
    return data


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_adapter(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, adapter_dir)


def test_every_steps_logs_all_metrics_and_keeps_the_best_adapter(tmp_path):
    data = run_config(tmp_path / "long", max_steps=6)
    # The worst validation loss (max) is an early step, so best/ cannot just be the last adapter.
    data["eval"].update({"every_steps": 2, "best_metric": "loss", "best_mode": "max"})
    out = tmp_path / "long"
    sft.run(validate_config(data))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [2, 4, 6]
    for record in validation:
        for task, metrics in EXPECTED_METRICS.items():
            logged = {k.split("/")[2] for k in record if k.startswith(f"task/{task}/")}
            assert logged == metrics
        accuracies = [record[f"task/{t}/accuracy"] for t in EXPECTED_METRICS]
        assert record["mean/accuracy"] == pytest.approx(sum(accuracies) / 3)

    worst = max(validation, key=lambda r: r["loss"])
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": worst["step"], "metric": "loss", "mode": "max", "value": worst["loss"]}
    assert best["step"] < 6
    # The last evaluation is the final one: eval_results.json holds the same figures.
    final = json.loads((out / "eval_results.json").read_text())["tasks"]
    assert final["banking77"]["accuracy"] == validation[-1]["task/banking77/accuracy"]

    # best/ is a standard adapter equal to the one a run stopped at that step ends with.
    short = tmp_path / "short"
    sft.run(validate_config(run_config(short, max_steps=best["step"])))
    best_model = lora_weights(load_adapter(out / "base_model", out / "best"))
    at_step = lora_weights(load_adapter(short / "base_model", short / "adapter"))
    last = lora_weights(load_adapter(out / "base_model", out / "adapter"))
    assert best_model.keys() == at_step.keys() and best_model
    assert all(torch.equal(best_model[k], at_step[k]) for k in best_model)
    assert not all(torch.equal(best_model[k], last[k]) for k in best_model)
    assert (out / "best" / "tokenizer.json").is_file()


def test_best_metric_must_name_a_task_and_a_metric_of_it(tmp_path):
    data = run_config(tmp_path)
    data["eval"]["best_metric"] = "task/banking78/accuracy"
    with pytest.raises(ConfigError, match="names no task of this config; tasks: banking77"):
        validate_config(data)
    data["eval"]["best_metric"] = "accuracy"
    with pytest.raises(ConfigError, match="must be 'loss', 'task/<task>/<metric>' or 'mean/"):
        validate_config(data)
    data["eval"]["best_metric"] = "task/commonsense_qa/bleu"
    with pytest.raises(ValueError, match="not a metric of these tasks; choose one of: loss, "):
        sft.run(validate_config(data))


def test_a_resumed_run_keeps_a_better_earlier_best(tmp_path):
    saved = []

    def save(path):
        path.mkdir(parents=True)
        saved.append(path.name)

    first = BestCheckpoint(tmp_path, "task/a/accuracy", None, save, resumed=False)
    assert first.mode == "max"
    assert first.update({"step": 2, "task/a/accuracy": 0.5})
    resumed = BestCheckpoint(tmp_path, "task/a/accuracy", None, save, resumed=True)
    assert not resumed.update({"step": 4, "task/a/accuracy": 0.4})
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 2
    assert resumed.update({"step": 6, "task/a/accuracy": 0.7})
    assert json.loads((tmp_path / "best" / "best.json").read_text())["value"] == 0.7
    assert not (tmp_path / "best.tmp").exists()
    # Starting over ignores the old best.json.
    fresh = BestCheckpoint(tmp_path, "task/a/accuracy", None, save, resumed=False)
    assert fresh.update({"step": 2, "task/a/accuracy": 0.1})
    with pytest.raises(KeyError, match="'task/a/accuracy' is not in the validation record"):
        fresh.update({"step": 4, "loss": 1.0})

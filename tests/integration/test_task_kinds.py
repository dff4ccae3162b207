"""QA, chat and GLUE-layout tasks from local files through a real (short) training run."""

import json

import datasets
import pytest

from multitune.config import validate_config
from multitune.recipes import sft
from multitune.tasks.base import TaskDataError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def local_tasks(tmp_path):
    cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Seoul", "Hanoi"]
    write_jsonl(
        tmp_path / "qa" / "train.jsonl",
        [
            {"question": f"Which city is number {i}?", "context": f"City {i} is {c}.", "answer": c}
            for i, c in enumerate(cities * 5)
        ],
    )
    write_jsonl(
        tmp_path / "chat" / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Say hello to {c}."},
                    {"role": "assistant", "content": f"Hello, {c}!"},
                ]
            }
            for c in cities * 5
        ],
    )
    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": datasets.Value("int32"),
        }
    )
    rows = {
        "sentence1": [f"The cat sat {i}." for i in range(40)],
        "sentence2": [
            f"A cat was sitting {i}." if i % 2 else f"Stocks fell {i}." for i in range(40)
        ],
        "label": [i % 2 for i in range(40)],
        "idx": list(range(40)),
    }
    (tmp_path / "mrpc").mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            tmp_path / "mrpc" / f"{split}.parquet"
        )
    return tmp_path


def test_qa_chat_and_glue_tasks_train_and_report_their_metrics(local_tasks):
    cfg = validate_config(
        {
            "output_dir": str(local_tasks / "run"),
            "model": {"tiny": {"size": "nano"}},
            "lora": {"r": 4, "alpha": 8},
            "tasks": [
                {"name": "qa", "dataset": str(local_tasks / "qa"), "kind": "qa"},
                {"name": "chat", "dataset": str(local_tasks / "chat"), "kind": "chat"},
                {"preset": "glue_mrpc", "dataset": str(local_tasks / "mrpc")},
            ],
            "data": {"max_seq_len": 128},
            "train": {"max_steps": 3, "micro_batch_size": 8, "progress_bar": False},
            "eval": {"before_training": False, "max_new_tokens": 8},
        }
    )
    results = sft.run(cfg)["tasks"]
    assert {"bleu", "chrf", "rouge_l", "exact_match", "token_f1"} <= set(results["qa"])
    assert {"bleu", "chrf", "rouge_l"} <= set(results["chat"]) and "exact_match" not in results[
        "chat"
    ]
    mrpc = results["glue_mrpc"]
    assert {"accuracy", "f1", "mcc", "macro_f1", "top_confused"} <= set(mrpc)
    matrix = json.loads((cfg.output_dir / "confusion" / "glue_mrpc.json").read_text())
    assert matrix["labels"] == ["not_equivalent", "equivalent"]
    assert sum(map(sum, matrix["matrix"])) == mrpc["n"]
    assert (cfg.output_dir / "confusion" / "glue_mrpc.png").is_file()
    report = json.loads((cfg.output_dir / "data_report.json").read_text())
    assert report["glue_mrpc"]["examples"]["test"] == 40


def test_empty_split_is_a_clear_error_not_a_zero_metric(local_tasks):
    write_jsonl(local_tasks / "empty" / "train.jsonl", [])
    (local_tasks / "empty" / "train.jsonl").write_text("")
    cfg = validate_config(
        {
            "output_dir": str(local_tasks / "run2"),
            "tasks": [{"name": "qa", "dataset": str(local_tasks / "empty"), "kind": "qa"}],
        }
    )
    with pytest.raises(TaskDataError, match="empty|could not read"):
        sft.run(cfg)


@pytest.mark.slow
def test_tiny_model_learns_multiple_choice_answered_by_text(tmp_path):
    """answer_format text on the sample's commonsense_qa: the random-init tiny model, which stays
    at chance answering by letter (README), learns to answer with the right choice's text.

    It needs the small size: micro stayed at chance (0.14-0.26 after 10 epochs of 400 rows at lr
    5e-3, 8 or 25 epochs of 900 at 1e-2); small at lr 3e-3 reached 1.00 after 12 epochs of 900.
    """
    from tests.conftest import SAMPLE

    cfg = validate_config(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name": "builtin:tiny-llama", "tiny": {"size": "small"}},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["embed_tokens"]},
            "tasks": [
                {
                    "preset": "commonsense_qa",
                    "dataset": str(SAMPLE / "commonsense_qa"),
                    "answer_format": "text",
                    "max_examples": 900,
                }
            ],
            "data": {"max_seq_len": 160},
            "train": {"epochs": 5, "lr": 3e-3, "micro_batch_size": 16, "progress_bar": False},
            "eval": {"batch_size": 32, "max_examples": 80},
        }
    )
    results = sft.run(cfg)
    after = results["tasks"]["commonsense_qa"]
    assert after["answer_format"] == "text"
    assert after["accuracy"] >= 0.6, after["accuracy"]  # chance: 0.2
    assert after["accuracy"] >= results["base"]["tasks"]["commonsense_qa"]["accuracy"] + 0.3

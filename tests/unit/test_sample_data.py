"""The committed sample datasets: reproducible from the script, in the hub's exact layouts."""

import collections
import functools
import importlib.util
import random
from pathlib import Path

import datasets
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
FILES = [
    "banking77/train.parquet",
    "banking77/test.parquet",
    "commonsense_qa/train.parquet",
    "commonsense_qa/validation.parquet",
    "commonsense_qa/test.parquet",
    "text_claims/train.csv",
    "ultrafeedback/train_prefs.parquet",
    "ultrafeedback/test_prefs.parquet",
]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_sample_data", ROOT / "scripts" / "make_sample_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load(path: Path) -> datasets.Dataset:
    """Read a file the way ``multitune`` does (through ``datasets``), once per path."""
    builder = "csv" if path.suffix == ".csv" else "parquet"
    return datasets.load_dataset(builder, data_files=str(path), split="train")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    written = _load_script().write_sample_data(out, seed=0)
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(FILES)
    return out


@pytest.mark.parametrize("name", FILES)
def test_regenerating_gives_the_committed_rows(regenerated, name):
    # Parquet bytes embed library versions, so compare what a reader gets back.
    committed, fresh = _load(SAMPLE / name), _load(regenerated / name)
    assert committed.features == fresh.features
    assert committed.to_list() == fresh.to_list()


def test_a_different_seed_gives_different_rows():
    build = _load_script().build_text_claims
    assert build(random.Random("text_claims-0")) != build(random.Random("text_claims-1"))


def test_banking77_label_is_a_classlabel_sorted_case_insensitively():
    for split, per_intent in [("train", 100), ("test", 25)]:
        data = _load(SAMPLE / "banking77" / f"{split}.parquet")
        feature = data.features["label"]
        assert isinstance(feature, datasets.ClassLabel)
        assert feature.names == sorted(feature.names, key=str.lower)
        assert feature.names != sorted(feature.names)  # a capitalised name tests the ordering
        assert {"card_arrival", "card_linking", "Refund_not_showing_up"} <= set(feature.names)
        assert list(data.features) == ["text", "label"]
        counts = collections.Counter(data["label"])
        assert counts == dict.fromkeys(range(len(feature.names)), per_intent)


def test_banking77_splits_share_no_text():
    train, test = (_load(SAMPLE / "banking77" / f"{s}.parquet")["text"] for s in ("train", "test"))
    assert not set(train) & set(test)


def test_commonsense_qa_has_the_hub_columns_and_choice_struct():
    expected = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "question_concept": datasets.Value("string"),
            "choices": {
                "label": datasets.List(datasets.Value("string")),
                "text": datasets.List(datasets.Value("string")),
            },
            "answerKey": datasets.Value("string"),
        }
    )
    sizes = {"train": 900, "validation": 200, "test": 100}
    for split, size in sizes.items():
        data = _load(SAMPLE / "commonsense_qa" / f"{split}.parquet")
        assert data.features == expected
        assert len(data) == size
        for row in data:
            assert len(row["id"]) == 32 and int(row["id"], 16) >= 0
            assert row["choices"]["label"] == ["A", "B", "C", "D", "E"]
            assert len(set(row["choices"]["text"])) == 5
            assert row["question_concept"].lower() in row["question"].lower()
            if split == "test":
                assert row["answerKey"] == ""
            else:
                assert row["answerKey"] in row["choices"]["label"]


def test_commonsense_qa_answer_positions_are_roughly_uniform():
    keys = _load(SAMPLE / "commonsense_qa" / "train.parquet")["answerKey"]
    counts = collections.Counter(keys)
    assert sorted(counts) == ["A", "B", "C", "D", "E"]
    # 900 rows: 180 expected per letter, standard deviation ~12.
    assert all(140 <= n <= 220 for n in counts.values()), counts


def test_commonsense_qa_has_exactly_one_choice_of_the_asked_category():
    categories = _load_script().CSQA_CATEGORIES
    category_of = {answer: c for c, entry in categories.items() for _, _, answer in entry["items"]}
    data = _load(SAMPLE / "commonsense_qa" / "validation.parquet")
    for row in data:
        texts = row["choices"]["text"]
        answer = texts[row["choices"]["label"].index(row["answerKey"])]
        assert sorted(category_of[t] for t in texts).count(category_of[answer]) == 1


def test_text_claims_is_a_balanced_csv_with_two_string_labels():
    frame = pd.read_csv(SAMPLE / "text_claims" / "train.csv")
    assert list(frame.columns) == ["idx", "Text", "Label"]
    assert frame["idx"].tolist() == list(range(len(frame)))
    assert frame["Label"].value_counts().to_dict() == {"Claim": 250, "Not a Claim": 250}


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("banking77/train.parquet", "text"),
        ("banking77/test.parquet", "text"),
        ("commonsense_qa/train.parquet", "question"),
        ("commonsense_qa/validation.parquet", "question"),
        ("commonsense_qa/test.parquet", "question"),
        ("text_claims/train.csv", "Text"),
    ],
)
def test_no_text_repeats_within_a_split_and_texts_stay_short(name, column):
    texts = _load(SAMPLE / name)[column]
    assert len(set(texts)) == len(texts)
    words = [len(t.split()) for t in texts]
    assert max(words) <= 30
    assert sum(words) / len(words) <= 25


def test_sample_data_stays_under_one_megabyte():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 1_000_000

"""Task kinds on real `datasets` objects: columns, labels, and clear errors for bad rows."""

import datasets
import pytest
from tests.conftest import small_config_dict

from multitune.config import validate_config
from multitune.data.pipeline import load_tasks, tokenize_tasks
from multitune.tasks import classification, multiple_choice
from multitune.tasks.base import TaskDataError


def task_cfg(**fields):
    base = {"name": "t", "dataset": "local/x", "kind": "classification"}
    return validate_config({"tasks": [{**base, **fields}]}).tasks[0]


def claims(**columns):
    return datasets.Dataset.from_dict(columns)


def test_claims_columns_found_by_name_with_string_labels():
    data = claims(
        idx=[0, 1, 2],
        Text=["a roof leak", "my address", "car crash"],
        Label=["Claim", "Not a Claim", "Claim"],
    )
    spec = classification.resolve(task_cfg(), data, 0)
    assert spec.columns == {"text": "Text", "label": "Label"}
    assert spec.label_names == ("Claim", "Not a Claim")
    examples = classification.to_examples(data, "train", spec)
    assert [e.answer for e in examples] == ["Claim", "Not a Claim", "Claim"]
    assert "Text: a roof leak" in examples[0].messages[-2]["content"]


def test_ambiguous_columns_fail_and_name_the_fix():
    data = claims(text=["a"], Text=["b"], label=["Claim"])
    with pytest.raises(
        TaskDataError,
        match=r"several columns could hold the text \(text, Text\); set tasks\.0\.columns\.text",
    ):
        classification.resolve(task_cfg(), data, 0)


def test_missing_column_names_dataset_and_columns():
    data = claims(body=["a"], label=["x"])
    with pytest.raises(
        TaskDataError,
        match=r"local/x: no text column found among body, label; set tasks\.0\.columns\.text",
    ):
        classification.resolve(task_cfg(), data, 0)
    with pytest.raises(
        TaskDataError,
        match=r"tasks\.0\.columns\.text is 'txt', but the dataset's columns are body, label",
    ):
        classification.resolve(task_cfg(columns={"text": "txt"}), data, 0)


def test_label_outside_the_label_set_names_row_and_column():
    data = claims(text=["a", "b", "c"], label=["Claim", "Not a Claim", "Maybe"])
    spec = classification.resolve(task_cfg(label_names=["Claim", "Not a Claim"]), data, 0)
    with pytest.raises(
        TaskDataError,
        match=r"local/x \[train\] row 2, column 'label': label 'Maybe' is not in the label set",
    ):
        classification.to_examples(data, "train", spec)


def test_empty_text_names_row():
    data = claims(text=["fine", "  "], label=["Claim", "Claim"])
    spec = classification.resolve(task_cfg(label_names=["Claim", "Not a Claim"]), data, 0)
    with pytest.raises(TaskDataError, match=r"\[test\] row 1, column 'text': the text is empty"):
        classification.to_examples(data, "test", spec)


def test_integer_labels_need_names_or_mapping(tmp_path):
    data = claims(text=["a", "b"], label=[0, 1])
    with pytest.raises(TaskDataError, match="non-string labels without names; set label_names"):
        classification.resolve(task_cfg(), data, 0)
    names = tmp_path / "labels.txt"
    names.write_text("negative\npositive\n")
    spec = classification.resolve(task_cfg(label_names=str(names)), data, 0)
    assert [e.answer for e in classification.to_examples(data, "train", spec)] == [
        "negative",
        "positive",
    ]
    mapped = classification.resolve(
        task_cfg(label_mapping={"0": "Not a Claim", "1": "Claim"}), data, 0
    )
    assert mapped.label_names == ("Not a Claim", "Claim")
    assert [e.answer for e in classification.to_examples(data, "train", mapped)] == [
        "Not a Claim",
        "Claim",
    ]
    with pytest.raises(TaskDataError, match=r"row 1, column 'label': label id 5 is outside 0\.\.1"):
        spec1 = classification.resolve(task_cfg(label_names=["a", "b"]), data, 0)
        classification.to_examples(claims(text=["a", "b"], label=[0, 5]), "train", spec1)


def test_class_label_names_come_from_the_feature():
    names = sorted(["card_linking", "Refund_not_showing_up", "card_arrival"], key=str.lower)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    data = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [2, 0]}, features=features)
    spec = classification.resolve(task_cfg(), data, 0)
    assert spec.label_names == ("card_arrival", "card_linking", "Refund_not_showing_up")
    assert [e.answer for e in classification.to_examples(data, "train", spec)] == [
        "Refund_not_showing_up",
        "card_arrival",
    ]


def test_multiple_choice_rejects_unlabelled_rows_by_number():
    row = {
        "id": "1",
        "question": "q?",
        "question_concept": "c",
        "choices": {"label": ["A", "B"], "text": ["x", "y"]},
        "answerKey": "B",
    }
    data = datasets.Dataset.from_list([row, {**row, "answerKey": ""}])
    spec = multiple_choice.resolve(task_cfg(kind="multiple_choice"), data, 0)
    with pytest.raises(
        TaskDataError, match=r"\[test\] row 1, column 'answerKey': the answer is empty"
    ):
        multiple_choice.to_examples(data, "test", spec)
    first = multiple_choice.to_examples(data.select([0]), "train", spec)[0]
    assert first.answer == "B" and first.candidates == ("A", "B")
    assert "A. x\nB. y" in first.messages[-2]["content"]


def test_multiple_choice_text_format_trains_the_choice_text():
    row = {
        "question": "Where is milk kept cold?",
        "choices": {"label": ["A", "B", "C"], "text": ["garage", " fridge ", "oven"]},
        "answerKey": "B",
    }
    data = datasets.Dataset.from_list([row])
    spec = multiple_choice.resolve(task_cfg(kind="multiple_choice", answer_format="text"), data, 0)
    example = multiple_choice.to_examples(data, "train", spec)[0]
    assert spec.answer_format == "text"
    assert example.answer == "fridge" and example.messages[-1]["content"] == "fridge"
    assert example.candidates == ("garage", "fridge", "oven")
    assert example.stratum == "B"  # splits still balance the answer positions
    prompt = example.messages[-2]["content"]
    assert "- garage\n- fridge\n- oven" in prompt and "B." not in prompt
    letter = multiple_choice.resolve(task_cfg(kind="multiple_choice"), data, 0)
    assert letter.answer_format == "letter"
    assert multiple_choice.to_examples(data, "train", letter)[0].answer == "B"


def test_multiple_choice_text_format_refuses_indistinguishable_choices():
    row = {"question": "q?", "choices": ["same", "same", "other"], "answerKey": "C"}
    data = datasets.Dataset.from_list([row])
    spec = multiple_choice.resolve(task_cfg(kind="multiple_choice", answer_format="text"), data, 0)
    with pytest.raises(TaskDataError, match=r"row 0, column 'choices': two choices have the same"):
        multiple_choice.to_examples(data, "train", spec)


def test_answer_format_is_refused_on_other_kinds():
    with pytest.raises(Exception, match="answer_format applies to multiple_choice tasks"):
        task_cfg(kind="classification", answer_format="text")


def test_sample_data_loads_splits_and_reports(tmp_path, tiny_tokenizer):
    cfg = validate_config(small_config_dict(tmp_path, max_examples=100))
    tasks = load_tasks(cfg)
    by_name = {t.spec.name: t for t in tasks}
    counts = {n: {s: len(v) for s, v in t.examples.items()} for n, t in by_name.items()}
    assert counts["banking77"]["test"] == 250 and counts["commonsense_qa"]["test"] == 200
    assert "test" not in counts["text_claims"]  # the hub serves only a train split
    for split_counts in counts.values():
        assert split_counts["train"] + split_counts["validation"] == 100
        # Stratified: within one example per class of 20.
        assert abs(split_counts["validation"] - 20) <= 5
    tokenize_tasks(tasks, tiny_tokenizer, cfg)
    report = by_name["banking77"].report()
    assert report["rows_loaded"] == {"train": 1000, "test": 250}
    assert report["label_names"][:3] == ["activate_my_card", "card_arrival", "card_linking"]

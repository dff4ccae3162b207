"""Preference pairs: dataset rows (errors name the row), tokenization drops, mined negatives."""

import datasets
import pytest
import torch
from tests.conftest import SAMPLE, small_config_dict
from tests.unit.test_dpo_step import plain_logprob

from multitune.config import validate_config
from multitune.data.formatting import IGNORE_INDEX, tokenize_example
from multitune.data.pipeline import load_tasks, training_corpus
from multitune.data.preference import (
    PreferencePair,
    _with_answer,
    mined_negative_pairs,
    pairs_from_rows,
    random_negative_pairs,
    tokenize_pairs,
)
from multitune.models.loading import load_model_and_tokenizer
from multitune.tasks.base import TaskDataError


def rows(**columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: list(v) for k, v in columns.items()})


def test_ultrafeedback_layout_gives_the_user_turn_and_both_answers():
    data = datasets.load_dataset(
        "parquet", data_files=str(SAMPLE / "ultrafeedback" / "test_prefs.parquet"), split="train"
    )
    pairs = pairs_from_rows(data, "uf", "test_prefs")
    assert len(pairs) == 60
    first = data[0]
    assert pairs[0].prompt == ({"role": "user", "content": first["prompt"]},)
    assert pairs[0].chosen == first["chosen"][-1]["content"]
    assert pairs[0].rejected == first["rejected"][-1]["content"]


def test_plain_text_columns():
    pairs = pairs_from_rows(rows(prompt=["2+2?"], chosen=["4"], rejected=["5"]), "p", "train")
    assert pairs == [
        PreferencePair("p", "train", 0, ({"role": "user", "content": "2+2?"},), "4", "5")
    ]


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        (["4", " "], ["5", "3"], r"p \[train\] row 1, column 'chosen': the answer is empty"),
        (
            ["4", "3"],
            ["5", "3"],
            r"p \[train\] row 1, column 'chosen': chosen and rejected are identical",
        ),
        (["4", "3"], ["5", ""], r"p \[train\] row 1, column 'rejected': the answer is empty"),
    ],
)
def test_bad_rows_are_reported_with_their_row_number(chosen, rejected, message):
    data = rows(prompt=["2+2?", "1+2?"], chosen=chosen, rejected=rejected)
    with pytest.raises(TaskDataError, match=message):
        pairs_from_rows(data, "p", "train")


def test_message_lists_must_end_with_the_assistant_and_share_the_prompt():
    user = {"role": "user", "content": "hi"}
    other = {"role": "user", "content": "hello"}
    bot = {"role": "assistant", "content": "yo"}
    bad_end = rows(prompt=["hi"], chosen=[[bot, user]], rejected=[[user, bot]])
    with pytest.raises(TaskDataError, match="row 0, column 'chosen': the last message is not"):
        pairs_from_rows(bad_end, "p", "train")
    differ = rows(prompt=["hi"], chosen=[[user, bot]], rejected=[[other, {**bot, "content": "no"}]])
    with pytest.raises(TaskDataError, match="row 0, column 'rejected': its conversation"):
        pairs_from_rows(differ, "p", "train")
    missing = rows(prompt=["hi"], chosen=["a"])
    with pytest.raises(TaskDataError, match="missing rejected"):
        pairs_from_rows(missing, "p", "train")


def test_tokenized_pairs_mask_the_prompt_and_drop_answers_that_cannot_fit(tiny_tokenizer, tmp_path):
    cfg = validate_config({**small_config_dict(tmp_path), "data": {"max_seq_len": 90}})
    prompt = ({"role": "user", "content": "Where would you keep the milk? " * 10},)
    fits = PreferencePair("t", "train", 0, prompt, "fridge", "oven")
    too_long = PreferencePair("t", "train", 1, prompt, "fridge", "garage oven " * 60)
    kept, dropped = tokenize_pairs([fits, too_long, fits], tiny_tokenizer, cfg)
    assert dropped == {"answer_too_long": 1}
    assert [p.index for p in kept] == [0, 1]
    pair = kept[0]
    assert pair.chosen.truncated  # the prompt was cut, never the answer
    answer = [t for t in pair.chosen.labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(answer[:-1]) == "fridge"
    assert pair.chosen.prompt_length == pair.rejected.prompt_length
    assert (
        pair.chosen.input_ids[: pair.chosen.prompt_length]
        == (pair.rejected.input_ids[: pair.rejected.prompt_length])
    )


@pytest.fixture(scope="module")
def tasks_and_model(tmp_path_factory):
    cfg = validate_config(small_config_dict(tmp_path_factory.mktemp("pref"), max_examples=30))
    tasks = load_tasks(cfg, include_test=False)
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, training_corpus(tasks), 0, torch.device("cpu")
    )
    return cfg, tasks, model.eval(), tokenizer


@pytest.mark.parametrize("task_index", [0, 1, 2])
def test_mined_negatives_are_the_models_top_wrong_answers(tasks_and_model, task_index):
    cfg, tasks, model, tokenizer = tasks_and_model
    task = tasks[task_index]
    examples = task.examples["validation"][:5]
    pairs, unscored = mined_negative_pairs(model, tokenizer, task, "validation", examples, cfg)
    assert unscored == 0 and len(pairs) == 5
    kwargs = {"date_string": cfg.data.template_date}
    for example, pair in zip(examples, pairs):
        assert pair.chosen == example.answer
        assert pair.rejected != example.answer and pair.rejected in example.candidates
        scores = {}
        with torch.no_grad():
            for candidate in example.candidates:
                tokenized = tokenize_example(
                    _with_answer(example.prompt_messages, candidate), tokenizer, 160, kwargs
                )
                scores[candidate] = plain_logprob(model, tokenized).item()
        wrong = {c: s for c, s in scores.items() if c != example.answer}
        assert pair.rejected == max(wrong, key=wrong.get)
        assert pair.meta["rejected_logprob"] == pytest.approx(wrong[pair.rejected], abs=1e-3)


def test_random_negatives_are_wrong_and_seeded(tasks_and_model):
    cfg, tasks, _, _ = tasks_and_model
    task = tasks[0]
    examples = task.examples["train"]
    first = random_negative_pairs(task, "train", examples, seed=0)
    assert first == random_negative_pairs(task, "train", examples, seed=0)
    assert all(p.rejected != p.chosen and p.rejected in task.spec.label_names for p in first)
    assert len({p.rejected for p in first}) > 3

"""The loss mask covers exactly the answer tokens, for every task kind; truncation keeps them."""

import pytest
from tests.conftest import TEMPLATE_KWARGS

from multitune.data.formatting import IGNORE_INDEX, tokenize_example
from multitune.tasks.base import Example, chat

EOT = "<|eot_id|>"


def answer_text(tokenizer, tokenized) -> str:
    ids = [t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX]
    assert [label for label in tokenized.labels if label != IGNORE_INDEX] == ids
    return tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("user", "answer"),
    [
        ("Classify the text.\n\nText: my card has not arrived", "card_arrival"),
        ("Where would you keep milk?\n\nA. fridge\nB. garage", "A"),
        ("Is this a claim? My roof was damaged in the storm.", "Not a Claim"),
        ("What is the capital of France?", "Paris is the capital."),
    ],
)
def test_mask_covers_exactly_the_answer(tiny_tokenizer, user, answer):
    example = Example(task="t", row=0, messages=chat("Be brief.", user, answer), answer=answer)
    tokenized = tokenize_example(example, tiny_tokenizer, 512, TEMPLATE_KWARGS)
    assert answer_text(tiny_tokenizer, tokenized) == answer + EOT
    # Everything before the answer is the rendered prompt with the generation header.
    prompt = tiny_tokenizer.apply_chat_template(
        list(example.messages[:-1]), tokenize=False, add_generation_prompt=True, **TEMPLATE_KWARGS
    )
    assert tiny_tokenizer.decode(tokenized.input_ids[: tokenized.prompt_length]) == prompt
    assert tokenized.labels[: tokenized.prompt_length] == [IGNORE_INDEX] * tokenized.prompt_length
    assert tiny_tokenizer.decode(tokenized.input_ids) == prompt + answer + EOT


def test_multi_turn_chat_trains_on_every_assistant_turn(tiny_tokenizer):
    messages = (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "And the rate?"},
        {"role": "assistant", "content": "The rate is low."},
    )
    example = Example(task="chat", row=0, messages=messages, answer="The rate is low.")
    tokenized = tokenize_example(example, tiny_tokenizer, 512, TEMPLATE_KWARGS)
    assert answer_text(tiny_tokenizer, tokenized) == "Hello there." + EOT + "The rate is low." + EOT


def test_truncation_cuts_the_prompt_and_keeps_the_answer(tiny_tokenizer):
    long_text = " ".join(f"word{i}" for i in range(300))
    example = Example(task="t", row=0, messages=chat(None, long_text, "card_arrival"), answer="x")
    full = tokenize_example(example, tiny_tokenizer, 10_000, TEMPLATE_KWARGS)
    cut = tokenize_example(example, tiny_tokenizer, 120, TEMPLATE_KWARGS)
    assert not full.truncated and cut.truncated
    assert len(cut.input_ids) == 120 < len(full.input_ids)
    assert answer_text(tiny_tokenizer, cut) == "card_arrival" + EOT
    decoded = tiny_tokenizer.decode(cut.input_ids)
    assert decoded.startswith("<|begin_of_text|>") and "word0 word1" in decoded
    assert "word299" not in decoded and "<|start_header_id|>assistant<|end_header_id|>" in decoded


def test_example_that_cannot_fit_is_dropped_with_a_reason(tiny_tokenizer):
    long_answer = " ".join(f"answer{i}" for i in range(200))
    example = Example(task="t", row=0, messages=chat(None, "q", long_answer), answer=long_answer)
    assert tokenize_example(example, tiny_tokenizer, 64, TEMPLATE_KWARGS) == "answer_too_long"
    short_answer = Example(task="t", row=0, messages=chat("x " * 200, "tell me", "ok"), answer="ok")
    # The system prompt cannot be cut, so a prompt that stays too long is dropped, not mangled.
    assert tokenize_example(short_answer, tiny_tokenizer, 64, TEMPLATE_KWARGS) == "prompt_too_long"


def test_multi_turn_chat_keeps_whole_turns_when_too_long(tiny_tokenizer):
    messages = (
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second " * 200},
        {"role": "assistant", "content": "second answer"},
    )
    example = Example(task="chat", row=0, messages=messages, answer="second answer")
    first_turn = Example(task="chat", row=0, messages=messages[:2], answer="first answer")
    budget = len(tokenize_example(first_turn, tiny_tokenizer, 10_000, TEMPLATE_KWARGS).input_ids)
    tokenized = tokenize_example(example, tiny_tokenizer, budget + 20, TEMPLATE_KWARGS)
    assert tokenized.truncated
    assert answer_text(tiny_tokenizer, tokenized) == "first answer" + EOT

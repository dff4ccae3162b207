"""Evaluation scoring on the real tiny model: one-pass letters, constrained labels, generation."""

import pytest
import torch
from tests.conftest import TEMPLATE_KWARGS

from multitune.config.schema import TinyModelConfig
from multitune.data.formatting import tokenize_example
from multitune.evaluation.scoring import (
    choice_letters,
    choice_text_scores,
    constrained_labels,
    end_of_turn_id,
    greedy_generate,
    label_trie,
)
from multitune.models.tiny import build_tiny_model
from multitune.tasks.base import Example, chat


def tokenized(tokenizer, prompts, answers):
    return [
        tokenize_example(
            Example(task="t", row=i, messages=chat(None, p, a), answer=a),
            tokenizer,
            256,
            TEMPLATE_KWARGS,
            0,
            i,
        )
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]


def test_one_pass_letter_scoring_equals_a_naive_per_choice_loop(tiny_tokenizer):
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=3).eval()
    prompts = [f"Question {i}? " + "x " * (i * 3) + "\nA. one\nB. two\nC. three" for i in range(6)]
    examples = tokenized(tiny_tokenizer, prompts, ["A"] * 6)
    letters = ("A", "B", "C")
    fast = choice_letters(
        model,
        examples,
        {e.example_index: letters for e in examples},
        tiny_tokenizer,
        4,
        tiny_tokenizer.pad_token_id,
    )
    for e in examples:
        scores = []
        for letter in letters:  # score prompt + letter alone, unpadded, one choice at a time
            ids = (
                e.input_ids[: e.prompt_length]
                + tiny_tokenizer(letter, add_special_tokens=False)["input_ids"]
            )
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0, -2].log_softmax(-1)
            scores.append(logprobs[ids[-1]].item())
        assert fast[e.example_index] == max(range(3), key=scores.__getitem__)


def test_constrained_decoding_gives_valid_labels_from_an_untrained_model(tiny_tokenizer):
    names = ("card_arrival", "card_linking", "Claim", "Not a Claim", "card")
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    trie = label_trie(tiny_tokenizer, names, end_id)
    examples = tokenized(tiny_tokenizer, [f"text {i} " * (i + 1) for i in range(12)], ["card"] * 12)
    seen = set()
    for seed in range(3):
        model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=seed).eval()
        predicted = constrained_labels(model, examples, trie, 5, tiny_tokenizer.pad_token_id)
        assert sorted(predicted) == list(range(12))
        assert all(0 <= p < len(names) for p in predicted.values())
        seen |= set(predicted.values())
    assert len(seen) >= 2  # the prediction depends on the model, not a fixed fallback


def test_batched_generation_with_left_padding_equals_one_by_one(tiny_tokenizer):
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1).eval()
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    examples = tokenized(tiny_tokenizer, ["hi", "a longer prompt " * 4, "mid size one"], ["x"] * 3)
    batched = greedy_generate(model, examples, tiny_tokenizer, end_id, 3, 6)
    for e in examples:
        assert greedy_generate(model, [e], tiny_tokenizer, end_id, 1, 6) == {
            e.example_index: batched[e.example_index]
        }


def test_choice_text_scores_equal_a_direct_per_choice_mean_log_prob(tiny_tokenizer):
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=5).eval()
    prompts = [f"Where is item {i}? " + "y " * (i * 2) for i in range(5)]
    examples = tokenized(tiny_tokenizer, prompts, ["A"] * 5)
    texts = {
        e.example_index: ("fridge", "a very long garage door", "oven")[: 2 + e.example_index % 2]
        for e in examples
    }
    # About 7 choice rows a pass: 2 questions of different lengths (left-padded prompts) and
    # different numbers of choices share each pass; the last question goes alone.
    fast = choice_text_scores(
        model, examples, texts, tiny_tokenizer, 7, tiny_tokenizer.pad_token_id
    )
    assert sorted(fast) == [e.example_index for e in examples]
    for e in examples:
        direct = []
        for text in texts[e.example_index]:  # unpadded, one choice at a time, full logits
            prompt = e.input_ids[: e.prompt_length]
            answer = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            picked = [logprobs[len(prompt) - 1 + k, t] for k, t in enumerate(answer)]
            direct.append(torch.stack(picked).mean().item())
        assert fast[e.example_index] == pytest.approx(direct, abs=1e-4)

"""Evaluation scoring on the real tiny model: one-pass letters, constrained labels, generation."""

import pytest
import torch
from tests.conftest import TEMPLATE_KWARGS

from multitune.config.schema import TinyModelConfig
from multitune.data.formatting import tokenize_example
from multitune.evaluation.scoring import (
    answer_loss,
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
        predicted, _ = constrained_labels(model, examples, trie, 5, tiny_tokenizer.pad_token_id)
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


def test_text_answers_decode_only_to_each_questions_own_choices(tiny_tokenizer):
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    choices = {
        0: ("fridge", "garage", "oven"),
        1: ("card arrived", "card", "Claim"),
        2: ("Not a Claim", "exchange rate"),
    }
    tries = {i: label_trie(tiny_tokenizer, c, end_id) for i, c in choices.items()}
    examples = tokenized(tiny_tokenizer, [f"q{i} " * (i + 2) for i in range(3)], ["x"] * 3)
    for seed in range(4):
        model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=seed).eval()
        predicted, _ = constrained_labels(model, examples, tries, 2, tiny_tokenizer.pad_token_id)
        for index, picked in predicted.items():
            assert 0 <= picked < len(choices[index])


def test_text_answer_decoding_follows_the_model_exactly(tiny_tokenizer):
    """A handmade check: with one question, the greedy constrained path is the choice whose
    tokens win step by step, computed here by hand from unpadded full forwards."""
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=7).eval()
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    texts = ("card arrived", "card linking", "fridge")
    sequences = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [end_id] for t in texts]
    example = tokenized(tiny_tokenizer, ["Which one? card arrived, card linking or fridge"], ["x"])
    trie = label_trie(tiny_tokenizer, texts, end_id)
    picked = constrained_labels(model, example, {0: trie}, 1, tiny_tokenizer.pad_token_id)[0][0]
    prefix, alive = [], list(range(len(texts)))
    while len(alive) > 1 or len(prefix) < len(sequences[alive[0]]):
        ids = example[0].input_ids[: example[0].prompt_length] + prefix
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        allowed = {sequences[i][len(prefix)] for i in alive}
        best = max(allowed, key=lambda t: logits[t].item())
        prefix.append(best)
        alive = [i for i in alive if sequences[i][len(prefix) - 1] == best]
    assert picked == alive[0]


def test_constrained_decoding_pass_gives_the_answer_loss_and_the_same_labels(tiny_tokenizer):
    """The prompt pass also reads the gold answers: its loss equals answer_loss's (a separate
    right-padded forward), and its predictions equal decoding from the bare prompts."""
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=2).eval()
    names = ("card_arrival", "card_linking", "Claim", "Not a Claim")
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    trie = label_trie(tiny_tokenizer, names, end_id)
    prompts = [f"message {i} " + "about my card " * (i % 4) for i in range(9)]
    examples = tokenized(tiny_tokenizer, prompts, [names[i % 4] for i in range(9)])
    predicted, loss = constrained_labels(model, examples, trie, 4, tiny_tokenizer.pad_token_id)
    expected = answer_loss(model, examples, 3, tiny_tokenizer.pad_token_id)
    assert loss["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert loss["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    for e in examples:  # one example at a time, no padding, the full model's logits
        prefix = e.input_ids[: e.prompt_length]
        generated = []
        while not generated or generated[-1] != end_id:
            with torch.no_grad():
                logits = model(torch.tensor([prefix + generated])).logits[0, -1]
            allowed = trie.allowed_next(generated)
            generated.append(max(allowed, key=lambda t: logits[t].item()))
        assert predicted[e.example_index] == trie.label_index(generated)

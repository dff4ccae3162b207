"""Evaluation that runs a batch's common prompt prefix once predicts exactly what running every
row whole predicts, on the real tiny model (and SmolLM2, slow): constrained labels (with their
loss), the answer loss, choice letters, choice texts, generation, and every task kind through
the runner; and a batch whose prompts share too little takes the old path."""

import json
from contextlib import contextmanager

import pytest
import torch
from tests.conftest import SAMPLE, TEMPLATE_KWARGS, small_config_dict
from tests.unit.test_scoring import tokenized

from multitune.config import validate_config
from multitune.config.schema import TinyModelConfig
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample, tokenize_example
from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
from multitune.evaluation.runner import evaluate_tasks, predict_answers
from multitune.evaluation.scoring import (
    answer_loss,
    choice_letters,
    choice_text_scores,
    constrained_labels,
    end_of_turn_id,
    greedy_generate,
    label_trie,
)
from multitune.evaluation.shared_prefix import (
    MIN_SHARED_TOKENS,
    prefix_sharing_allowed,
    shared_prefix_length,
)
from multitune.models.lora import decoder_and_head
from multitune.models.tiny import build_tiny_model
from multitune.tasks.base import Example

LABELS = ("card_arrival", "card_linking", "Claim", "Not a Claim", "card")
INSTRUCTION = (
    "Classify the text. Answer with one of: card_arrival, card_linking, Claim, Not a Claim"
)
# Unequal lengths, so the rows' own tokens are left-padded behind the shared prefix.
TEXTS = ["my card", "where is the card I ordered last week " * 3, "fridge", "a claim " * 5, "x"]


@contextmanager
def decoder_forwards(model):
    """(batch size, columns) of every decoder forward while inside."""
    calls = []
    decoder, _ = decoder_and_head(model)
    hook = decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield calls
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=3).eval()


@pytest.fixture(scope="module")
def shared_examples(tiny_tokenizer):
    prompts = [f"{INSTRUCTION}\n\nText: {text}" for text in TEXTS]
    examples = tokenized(tiny_tokenizer, prompts, ["card", "Claim", "Not a Claim", "card", "x"])
    num_shared = shared_prefix_length([e.input_ids[: e.prompt_length] for e in examples])
    assert num_shared >= MIN_SHARED_TOKENS  # the tests below do share
    return examples


@pytest.fixture(scope="module")
def unshared_examples(tiny_tokenizer):
    """Bare prompts without the chat template (whose header every templated prompt shares),
    each starting with a word of its own."""
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    examples = []
    for index, text in enumerate(TEXTS):
        prompt = tiny_tokenizer(f"{text} {INSTRUCTION}", add_special_tokens=False)["input_ids"]
        answer = tiny_tokenizer("card", add_special_tokens=False)["input_ids"] + [end_id]
        labels = [IGNORE_INDEX] * len(prompt) + answer
        examples.append(TokenizedExample(prompt + answer, labels, len(prompt), 0, index, False))
    assert shared_prefix_length([e.input_ids[: e.prompt_length] for e in examples]) == 0
    return examples


def both_ways(model, fn, *args):
    """fn's result with the prefix shared and not, and the decoder forwards each ran."""
    results, forwards = [], []
    for share in (True, False):
        with decoder_forwards(model) as calls:
            results.append(fn(*args, share_prefix=share))
        forwards.append(calls)
    return results, forwards


def test_shared_prefix_length_leaves_each_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a prompt the others extend
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([[5]]) == 0


def test_constrained_labels_and_their_loss_are_the_same_with_a_shared_prefix(
    model, shared_examples, tiny_tokenizer
):
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    trie = label_trie(tiny_tokenizer, LABELS, end_id)
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, constrained_labels, model, shared_examples, trie, 3, pad
    )
    assert shared[0] == whole[0]
    assert shared[1]["loss"] == pytest.approx(whole[1]["loss"], rel=1e-5)
    # Two batches (3 + 2 rows): each ran its prefix once at batch 1, then its rows.
    prefix_runs = [calls for calls in forwards if calls[0] == 1]
    assert len(prefix_runs) == 2 and all(c[1] >= MIN_SHARED_TOKENS for c in prefix_runs)
    assert len(forwards) == len(whole_forwards) + 2
    assert all(c[0] > 1 for c in whole_forwards if c[1] > 1)


def test_answer_loss_is_the_same_with_a_shared_prefix(model, shared_examples, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, answer_loss, model, shared_examples, 3, pad
    )
    assert shared["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert len(forwards) == len(whole_forwards) + 2
    assert sum(b * n for b, n in forwards) < sum(b * n for b, n in whole_forwards)


def test_a_shared_prefix_stops_before_an_earlier_trained_answer(model, tiny_tokenizer):
    """Multi-turn prompts whose first answer (trained, so in the loss) is the same in every
    row: sharing it would drop its tokens from the loss, so the prefix stops before it."""
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    examples = []
    for index, text in enumerate(TEXTS):
        messages = (
            {"role": "user", "content": INSTRUCTION},
            {"role": "assistant", "content": "Send the text."},
            {"role": "user", "content": f"Text: {text}"},
            {"role": "assistant", "content": "card"},
        )
        example = Example(task="t", row=index, messages=messages, answer="card")
        examples.append(tokenize_example(example, tiny_tokenizer, 256, TEMPLATE_KWARGS, 0, index))
    trie = label_trie(tiny_tokenizer, LABELS, end_id)
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, constrained_labels, model, examples, trie, 3, pad
    )
    assert shared[0] == whole[0]
    assert shared[1]["loss"] == pytest.approx(whole[1]["loss"], rel=1e-5)
    assert len(forwards) == len(whole_forwards) + 2  # the header before the answer is shared
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, answer_loss, model, examples, 3, pad
    )
    assert shared["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert len(forwards) == len(whole_forwards) + 2


def test_text_choices_decode_the_same_with_a_shared_prefix(model, shared_examples, tiny_tokenizer):
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    choices = [("fridge", "garage", "oven"), ("card arrived", "card", "Claim"), LABELS]
    tries = {
        e.example_index: label_trie(tiny_tokenizer, choices[e.example_index % 3], end_id)
        for e in shared_examples
    }
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, constrained_labels, model, shared_examples, tries, 2, pad
    )
    assert shared[0] == whole[0]
    assert shared[1]["loss"] == pytest.approx(whole[1]["loss"], rel=1e-5)
    # Batches of 2, 2 and 1 rows: a lone row has nothing to share.
    assert len(forwards) == len(whole_forwards) + 2


def test_choice_letters_are_the_same_with_a_shared_prefix(model, shared_examples, tiny_tokenizer):
    letters = {e.example_index: ("A", "B", "C") for e in shared_examples}
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, choice_letters, model, shared_examples, letters, tiny_tokenizer, 3, pad
    )
    assert shared == whole
    assert len(forwards) == len(whole_forwards) + 2


def test_choice_text_scores_are_the_same_with_a_shared_prefix(
    model, shared_examples, tiny_tokenizer
):
    texts = {
        e.example_index: ("fridge", "a very long garage door", "oven") for e in shared_examples
    }
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, choice_text_scores, model, shared_examples, texts, tiny_tokenizer, 6, pad
    )
    assert shared.keys() == whole.keys()
    for index, scores in shared.items():
        assert scores == pytest.approx(whole[index], rel=1e-5)
        assert scores.index(max(scores)) == whole[index].index(max(whole[index]))
    assert len(forwards) > len(whole_forwards)


@pytest.fixture(scope="module")
def generating_model(tiny_tokenizer):
    """The tiny model with its own random output head: tied to the embeddings, a random model
    repeats the prompt's last token (whitespace after the assistant header) and generates ''."""
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=2).eval()
    torch.manual_seed(2)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


def test_generation_is_the_same_with_a_shared_prefix(
    generating_model, shared_examples, tiny_tokenizer
):
    model = generating_model
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, greedy_generate, model, shared_examples, tiny_tokenizer, end_id, 3, 8
    )
    assert shared == whole
    assert len(set(shared.values())) >= 2 and all(shared.values())  # texts that tell rows apart
    assert len(forwards) == len(whole_forwards) + 2


def test_prompts_that_share_too_little_take_the_unshared_path(
    model, generating_model, unshared_examples, tiny_tokenizer
):
    end_id = end_of_turn_id(tiny_tokenizer, TEMPLATE_KWARGS)
    trie = label_trie(tiny_tokenizer, LABELS, end_id)
    pad = tiny_tokenizer.pad_token_id
    (shared, whole), (forwards, whole_forwards) = both_ways(
        model, constrained_labels, model, unshared_examples, trie, 3, pad
    )
    assert shared == whole
    assert forwards == whole_forwards
    (shared, whole), (forwards, whole_forwards) = both_ways(
        generating_model, greedy_generate, generating_model, unshared_examples, tiny_tokenizer,
        end_id, 3, 4,
    )  # fmt: skip
    assert shared == whole
    assert forwards == whole_forwards


def every_kind_config(tmp_path, model: dict, max_examples: int, batch_size: int):
    """The demo's three tasks (multiple choice by text, as the demo has it) plus multiple choice
    by letter, QA and chat, evaluated in batches of unequal lengths."""
    chat = tmp_path / "chat" / "train.jsonl"
    chat.parent.mkdir(parents=True)
    rows = [
        [
            {"role": "user", "content": f"Say hello to {city}."},
            {"role": "assistant", "content": "Hi"},
        ]
        for city in ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Seoul", "Hanoi"] * 5
    ]
    chat.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    data = small_config_dict(tmp_path / "run")
    data["model"] = model
    data["tasks"][1]["answer_format"] = "text"
    csqa = str(SAMPLE / "commonsense_qa")
    data["tasks"] += [
        {"name": "csqa_letter", "preset": "commonsense_qa", "dataset": csqa},
        {
            "name": "csqa_as_qa",
            "dataset": csqa,
            "kind": "qa",
            "columns": {"question": "question", "answer": "answerKey"},
        },
        {"name": "chat", "dataset": str(chat.parent), "kind": "chat"},
    ]
    data["eval"] = {"batch_size": batch_size, "max_examples": max_examples, "max_new_tokens": 6}
    return validate_config(data)


def assert_evaluation_is_the_same_with_a_shared_prefix(model, tokenizer, tasks, cfg):
    decoder, _ = decoder_and_head(model)
    for task in tasks:
        examples = task.tokenized["validation"][: cfg.eval.max_examples]
        source = task.examples["validation"]
        args = (model, tokenizer, task.spec, source, examples, cfg.eval.batch_size)
        (shared, whole), (forwards, whole_forwards) = both_ways(
            model, predict_answers, *args, TEMPLATE_KWARGS, cfg.eval.max_new_tokens
        )
        name = task.spec.name
        assert shared[0] == whole[0], name
        if whole[1] is not None:
            assert shared[1]["loss"] == pytest.approx(whole[1]["loss"], rel=1e-5), name
        # Sharing ran: fewer token rows went through the decoder.
        assert sum(b * n for b, n in forwards) < sum(b * n for b, n in whole_forwards), name
    shared, whole = (
        evaluate_tasks(model, tokenizer, tasks, cfg, share_prefix=share) for share in (True, False)
    )
    for name, metrics in whole.items():
        metrics, shared_metrics = dict(metrics), dict(shared[name])
        for key in ("loss", "perplexity"):
            assert shared_metrics.pop(key) == pytest.approx(metrics.pop(key), rel=1e-5), name
        assert shared_metrics == metrics, name


# Both attention paths mask the pads between the shared prefix and a row's own tokens.
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_task_kind_evaluates_the_same_with_a_shared_prefix(tmp_path, attention):
    from multitune.models.loading import load_model_and_tokenizer

    tiny = {
        "name": "builtin:tiny-llama",
        "tiny": {"size": "nano"},
        "attn_implementation": attention,
    }
    cfg = every_kind_config(tmp_path, tiny, 10, 4)
    tasks = load_tasks(cfg, include_test=False)
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, training_corpus(tasks), cfg.seed, torch.device("cpu")
    )
    assert model.config._attn_implementation == attention
    tokenize_tasks(tasks, tokenizer, cfg)
    assert_evaluation_is_the_same_with_a_shared_prefix(model.eval(), tokenizer, tasks, cfg)


@pytest.mark.slow
def test_smollm2_evaluates_every_task_kind_the_same_with_a_shared_prefix(tmp_path, smollm2):
    model, tokenizer = smollm2
    cfg = every_kind_config(tmp_path, {"name": "builtin:smollm2-135m-instruct"}, 8, 4)
    tasks = load_tasks(cfg, include_test=False)
    tokenize_tasks(tasks, tokenizer, cfg)
    assert_evaluation_is_the_same_with_a_shared_prefix(model, tokenizer, tasks, cfg)


@pytest.mark.parametrize(
    "attn, setting, shares",
    [
        ("sdpa", "auto", True),
        ("eager", "auto", True),
        ("flash_attention_2", "auto", False),
        ("flash_attention_2", True, True),
        ("sdpa", False, False),
    ],
)
def test_evaluation_follows_data_share_prefix(tiny_tokenizer, attn, setting, shares):
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0)
    model.config._attn_implementation = attn
    assert prefix_sharing_allowed(model, setting) is shares

"""DPO mining: questions' candidate answers scored in one forward, each prompt once
(``preference.candidate_scores``), equal the full sequences scored one by one
(``dpo_step.sequence_logprobs``), on the tiny model with LoRA and on SmolLM2."""

import contextlib

import pytest
import torch
from tests.conftest import TEMPLATE_KWARGS

from multitune.config.schema import LoraConfig, TinyModelConfig
from multitune.data.formatting import tokenize_example
from multitune.data.preference import candidate_scores
from multitune.evaluation import shared_prefix
from multitune.models.lora import apply_lora
from multitune.models.tiny import build_tiny_model
from multitune.tasks.base import Example, chat
from multitune.training.dpo_step import sequence_logprobs

PROMPT = "Classify the text. Answer with one of: card_arrival, card_linking, Claim.\n\nText: hi"
# Answers of 1 to several tokens, so the candidates' suffixes are padded to different widths.
CANDIDATES = ["card_arrival", "Claim", "card_linking", "Not a Claim at all, card_arrival"]


def candidates(tokenizer, prompt=PROMPT, answers=CANDIDATES):
    return [
        tokenize_example(
            Example(task="t", row=0, messages=chat(None, prompt, a), answer=a),
            tokenizer,
            256,
            TEMPLATE_KWARGS,
        )
        for a in answers
    ]


def trained_lora(model):
    # LoRA B starts at 0; random B makes the adapter change every layer's output.
    peft = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return peft.eval()


SECOND = "Answer with the correct choice.\n\nQuestion: where do cards arrive?"


def one_by_one(model, questions, pad):
    with torch.no_grad():
        return [[sequence_logprobs(model, [e], pad).item() for e in q] for q in questions]


def test_questions_scored_in_one_forward_equal_each_full_sequence_with_lora(tiny_tokenizer):
    model = trained_lora(build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1))
    questions = [candidates(tiny_tokenizer), candidates(tiny_tokenizer, SECOND, CANDIDATES[:3])]
    pad = tiny_tokenizer.pad_token_id
    with decoder_forwards(model) as forwards:
        grouped = candidate_scores(model, questions, pad)
    # One forward for both questions, as one row: each prompt once (their common start, the
    # template's system block, once for both), then the candidates' own tokens.
    assert len(forwards) == 1 and forwards[0][0] == 1
    own = sum(len(e.input_ids) - (e.prompt_length - 1) for q in questions for e in q)
    assert forwards[0][1] < questions[0][0].prompt_length + questions[1][0].prompt_length + own
    expected = one_by_one(model, questions, pad)
    for scores, reference in zip(grouped, expected):
        torch.testing.assert_close(
            torch.tensor(scores), torch.tensor(reference), rtol=1e-5, atol=1e-5
        )
    assert len(set(expected[0])) == len(expected[0])  # distinct scores: a real comparison


def test_under_flash_attention_each_question_runs_from_its_kv_cache(tiny_tokenizer, monkeypatch):
    # flash-attention takes no prefix-sharing mask: each question's prompt runs at batch 1 and
    # its candidates continue from the cache (the flash branch, run here under sdpa).
    from multitune.data import preference

    monkeypatch.setattr(preference, "uses_flash_attention", lambda decoder: True)
    model = trained_lora(build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1))
    questions = [candidates(tiny_tokenizer), candidates(tiny_tokenizer, SECOND, CANDIDATES[:3])]
    pad = tiny_tokenizer.pad_token_id
    with decoder_forwards(model) as forwards:
        grouped = candidate_scores(model, questions, pad)
    first = questions[0]
    assert forwards[:2] == [(1, first[0].prompt_length - 1), (len(first), forwards[1][1])]
    assert len(forwards) == 4
    for scores, reference in zip(grouped, one_by_one(model, questions, pad)):
        torch.testing.assert_close(
            torch.tensor(scores), torch.tensor(reference), rtol=1e-5, atol=1e-5
        )


@contextlib.contextmanager
def decoder_forwards(model):
    """The (rows, columns) of every forward of the model's decoder inside the block."""
    shapes = []
    decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    hook = decoder.register_forward_pre_hook(
        lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        yield shapes
    finally:
        hook.remove()


def test_candidates_with_no_common_prefix_run_whole(tiny_tokenizer):
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1).eval()
    examples = candidates(tiny_tokenizer, answers=["Claim", "card_arrival"])
    # Make the second one start differently: nothing is shared, both run whole.
    examples[1].input_ids[0] = (examples[0].input_ids[0] + 1) % len(tiny_tokenizer)
    assert shared_prefix.shared_prefix_length([e.input_ids for e in examples]) == 0
    pad = tiny_tokenizer.pad_token_id
    with decoder_forwards(model) as forwards:
        (scores,) = candidate_scores(model, [examples], pad)
    assert len(forwards) == 1  # laid out whole, as lone examples
    torch.testing.assert_close(
        torch.tensor(scores),
        torch.tensor(one_by_one(model, [examples], pad)[0]),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.slow
def test_grouped_scores_equal_each_full_sequence_on_smollm2(smollm2):
    model, tokenizer = smollm2
    questions = [candidates(tokenizer), candidates(tokenizer, SECOND, CANDIDATES[:3])]
    with decoder_forwards(model) as forwards:
        grouped = candidate_scores(model, questions, tokenizer.pad_token_id)
    assert len(forwards) == 1
    expected = one_by_one(model, questions, tokenizer.pad_token_id)
    for scores, reference in zip(grouped, expected):
        torch.testing.assert_close(
            torch.tensor(scores), torch.tensor(reference), rtol=1e-5, atol=1e-4
        )

"""A question's candidate answers scored with the prompt run once equal the full sequences scored
one by one (``dpo_step.sequence_logprobs``), on the tiny model with LoRA and on SmolLM2."""

import pytest
import torch
from tests.conftest import TEMPLATE_KWARGS

from multitune.config.schema import LoraConfig, TinyModelConfig
from multitune.data.formatting import tokenize_example
from multitune.models.lora import apply_lora
from multitune.models.tiny import build_tiny_model
from multitune.tasks.base import Example, chat
from multitune.training import shared_prompt
from multitune.training.dpo_step import sequence_logprobs
from multitune.training.shared_prompt import grouped_sequence_logprobs, shared_prefix_length

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


def test_grouped_scores_equal_each_full_sequence_on_the_tiny_model_with_lora(tiny_tokenizer):
    model = trained_lora(build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1))
    examples = candidates(tiny_tokenizer)
    shared = shared_prefix_length(examples)
    # The whole prompt but its last token is shared; labels start after it.
    first_labelled = min(e.labels.index(next(x for x in e.labels if x != -100)) for e in examples)
    assert shared == first_labelled - 1 == examples[0].prompt_length - 1
    pad = tiny_tokenizer.pad_token_id
    grouped = grouped_sequence_logprobs(model, examples, pad)
    with torch.no_grad():
        one_by_one = torch.cat([sequence_logprobs(model, [e], pad) for e in examples])
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-5)
    assert len(set(one_by_one.tolist())) == len(examples)  # distinct scores: a real comparison


def test_examples_with_no_common_prefix_run_whole(tiny_tokenizer, monkeypatch):
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1).eval()
    examples = candidates(tiny_tokenizer, answers=["Claim", "card_arrival"])
    # Make the second one start differently: nothing is shared, the fallback scores them.
    examples[1].input_ids[0] = (examples[0].input_ids[0] + 1) % len(tiny_tokenizer)
    assert shared_prefix_length(examples) == 0
    calls = []
    real = shared_prompt.sequence_logprobs
    monkeypatch.setattr(
        shared_prompt,
        "sequence_logprobs",
        lambda *args: calls.append(len(args[1])) or real(*args),
    )
    pad = tiny_tokenizer.pad_token_id
    scores = grouped_sequence_logprobs(model, examples, pad)
    assert calls == [2]
    with torch.no_grad():
        torch.testing.assert_close(scores, sequence_logprobs(model, examples, pad))


@pytest.mark.slow
def test_grouped_scores_equal_each_full_sequence_on_smollm2(smollm2):
    model, tokenizer = smollm2
    examples = candidates(tokenizer)
    assert shared_prefix_length(examples) == examples[0].prompt_length - 1 > 30
    grouped = grouped_sequence_logprobs(model, examples, tokenizer.pad_token_id)
    with torch.no_grad():
        one_by_one = torch.cat(
            [sequence_logprobs(model, [e], tokenizer.pad_token_id) for e in examples]
        )
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-4)

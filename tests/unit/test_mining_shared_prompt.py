"""DPO mining: a question's candidate answers scored with the prompt run once
(``preference.candidate_scores``) equal the full sequences scored one by one
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


def test_grouped_scores_equal_each_full_sequence_on_the_tiny_model_with_lora(tiny_tokenizer):
    model = trained_lora(build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=1))
    examples = candidates(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    with decoder_forwards(model) as forwards:
        grouped = candidate_scores(model, examples, pad)
    # One batch-1 forward of the prompt but its last token, then the candidates' own tokens.
    assert forwards == [(1, examples[0].prompt_length - 1), (len(examples), forwards[1][1])]
    assert forwards[1][1] == max(len(e.input_ids) for e in examples) - forwards[0][1]
    with torch.no_grad():
        one_by_one = torch.cat([sequence_logprobs(model, [e], pad) for e in examples])
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-5)
    assert len(set(one_by_one.tolist())) == len(examples)  # distinct scores: a real comparison


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
    # Make the second one start differently: nothing is shared, both rows run whole.
    examples[1].input_ids[0] = (examples[0].input_ids[0] + 1) % len(tiny_tokenizer)
    assert shared_prefix.shared_prefix_length([e.input_ids for e in examples]) == 0
    pad = tiny_tokenizer.pad_token_id
    with decoder_forwards(model) as forwards:
        scores = candidate_scores(model, examples, pad)
    assert forwards == [(2, max(len(e.input_ids) for e in examples))]
    with torch.no_grad():
        torch.testing.assert_close(scores, sequence_logprobs(model, examples, pad))


@pytest.mark.slow
def test_grouped_scores_equal_each_full_sequence_on_smollm2(smollm2):
    model, tokenizer = smollm2
    examples = candidates(tokenizer)
    with decoder_forwards(model) as forwards:
        grouped = candidate_scores(model, examples, tokenizer.pad_token_id)
    assert forwards[0] == (1, examples[0].prompt_length - 1)  # the default system block and all
    with torch.no_grad():
        one_by_one = torch.cat(
            [sequence_logprobs(model, [e], tokenizer.pad_token_id) for e in examples]
        )
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-4)

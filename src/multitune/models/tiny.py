"""The built-in tiny model: Llama 3.2's design scaled down, plus a tokenizer trained offline.

Nothing here touches the network. The tokenizer reproduces what the masking and evaluation code
depends on in the real one: byte-level BPE with Llama 3's split pattern, the same special-token
strings, and a chat template of the same structure (a dated system block, header tokens, and
``<|eot_id|>`` after every turn).
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from multitune.config.schema import TinyModelConfig

TINY_MODEL_NAME = "builtin:tiny-llama"

# Llama 3's pre-tokenizer split pattern (tiktoken "cl100k"-style).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [
    BOS,
    EOS,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT,
    "<|eom_id|>",
    PAD,
    "<|python_tag|>",
]

# Same structure as Llama 3.2 Instruct's template (tools omitted): a system block that always
# carries "Cutting Knowledge Date" and "Today Date", then one header + content + <|eot_id|> per turn.
LLAMA32_STYLE_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# hidden, layers, heads, kv heads, intermediate: Llama 3.2's ratios (GQA 4:1 where possible,
# SwiGLU at ~2.7x hidden) at sizes that train in minutes on two CPU cores.
FINAL_NORM_GAIN = 3.0

TINY_SHAPES = {
    "nano": (64, 2, 4, 2, 176),
    "micro": (128, 4, 4, 2, 344),
    "small": (256, 6, 8, 2, 688),
}


def train_tiny_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; deterministic for the same texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chat scaffolding words are in the corpus so they get whole-word tokens, as in Llama 3.
    scaffold = [
        "system\n\n",
        "user\n\n",
        "assistant\n\n",
        "Cutting Knowledge Date: December 2023\n",
    ] * 8
    tokenizer.train_from_iterator(list(texts) + scaffold, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = LLAMA32_STYLE_CHAT_TEMPLATE
    return fast


def build_tiny_model(
    options: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int
) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture model; the same seed gives the same weights."""
    hidden, layers, heads, kv_heads, intermediate = TINY_SHAPES[options.size]
    vocab = max(len(tokenizer), options.vocab_size or 0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
        # With tied embeddings at the usual std 0.02, a logit is at most hidden x 0.02 (2.6 at
        # hidden 128): far too flat for any token to become likely, and LoRA cannot change that
        # scale. Unit-norm embeddings (std 1/sqrt(hidden)) and a final-norm gain of
        # FINAL_NORM_GAIN give a pretrained-like logit range (up to about gain x sqrt(hidden)).
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=hidden**-0.5)
        model.model.norm.weight.data.fill_(FINAL_NORM_GAIN)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model

"""Parameter counts: peft's own count on a meta-device model, and a closed form to check it."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as hf_logging

from multitune.config.schema import LoraConfig
from multitune.models.lora import apply_lora
from multitune.planning.architecture import Shape


@dataclass(frozen=True)
class ParameterCounts:
    base: int  # the pretrained model, tied weights counted once
    trainable: int  # LoRA adapters + modules_to_save copies
    total: int  # everything the peft model holds
    adapter: int  # LoRA A/B matrices (peft keeps them in float32)
    saved_modules: int  # full trainable copies (lora.modules_to_save), in the base dtype

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(
    config: PretrainedConfig, lora: LoraConfig, trust_remote_code: bool = False
) -> ParameterCounts:
    """Build the model on the meta device (no memory, no weights), apply the run's LoRA, count.

    ``trainable`` and ``total`` are peft's ``get_nb_trainable_parameters``, so the plan counts
    exactly what training will hold. Memoised: peft takes seconds to wrap a billion-parameter
    model, even on the meta device.
    """
    key = (config.to_json_string(), lora.model_dump_json(), trust_remote_code)
    if key not in _COUNTS:
        _COUNTS[key] = _count_on_meta_device(config, lora, trust_remote_code)
    return _COUNTS[key]


_COUNTS: dict[tuple[str, str, bool], ParameterCounts] = {}


def _count_on_meta_device(
    config: PretrainedConfig, lora: LoraConfig, trust_remote_code: bool
) -> ParameterCounts:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's tied-embedding advice is for real runs
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config, trust_remote_code=trust_remote_code
                )
            base = sum(p.numel() for p in model.parameters())
            peft_model = apply_lora(model, lora)
            trainable, total = peft_model.get_nb_trainable_parameters()
    finally:
        hf_logging.set_verbosity(verbosity)
    adapter = sum(
        p.numel()
        for name, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" in name
    )
    return ParameterCounts(base, trainable, total, adapter, trainable - adapter)


def analytic_parameter_counts(shape: Shape, lora: LoraConfig) -> ParameterCounts:
    """The same counts in closed form, for a Llama-style decoder without biases.

    base  = V*h*(1 if tied else 2) + L*(sum of in*out over the 7 linears + 2h) + h
    LoRA on a linear (in -> out) adds r*(in + out) per layer; on lm_head or embed_tokens
    r*(V + h) once. Each entry of modules_to_save adds a trainable copy of V*h (one shared copy
    when the embeddings are tied, since apply_lora keeps them tied).
    """
    h, v, r = shape.hidden, shape.vocab, lora.r
    linears = shape.linear_shapes()
    per_layer = sum(i * o for i, o in linears.values()) + 2 * h  # + two RMSNorm weights
    base = v * h * (1 if shape.tied_embeddings else 2) + shape.layers * per_layer + h
    adapter = 0
    for target in lora.target_modules:
        if target in linears:
            fan_in, fan_out = linears[target]
            adapter += shape.layers * r * (fan_in + fan_out)
        elif target in ("lm_head", "embed_tokens"):
            adapter += r * (v + h)
        else:
            raise ValueError(f"no closed form for LoRA on {target!r} of a Llama-style model")
    # With tied embeddings, apply_lora keeps trained embed_tokens/lm_head copies tied: one matrix.
    copies = len(lora.modules_to_save)
    saved = v * h * (min(copies, 1) if shape.tied_embeddings else copies)
    return ParameterCounts(base, adapter + saved, base + adapter + saved, adapter, saved)


def matmul_parameters(shape: Shape, lora: LoraConfig) -> tuple[int, int]:
    """(frozen, trainable) parameters a token passes through as matmuls, for FLOP counts.

    The embedding is a lookup, not a matmul; the head is one (tied or not). A trained copy of
    lm_head replaces the frozen head in the forward pass.
    """
    layers = shape.layers * sum(i * o for i, o in shape.linear_shapes().values())
    head = shape.vocab * shape.hidden
    lora_counts = analytic_parameter_counts(shape, lora)
    if "lm_head" in lora.modules_to_save:
        return layers, lora_counts.adapter + head
    return layers + head, lora_counts.adapter

"""QLoRA: the frozen base held in 4-bit NF4 (or 8-bit) by bitsandbytes, LoRA on top.

bitsandbytes (>= 0.48) runs its 4-bit and 8-bit layers on CPU as well as CUDA, so the same path
is tested here on CPU. Weights are quantized as transformers loads them (``from_pretrained`` with
a ``BitsAndBytesConfig``); the built-in tiny model, which is built in memory, goes through a
temporary folder to take the same path.
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from multitune.config.schema import ModelConfig

# 4-bit NF4 with double quantization and bf16 compute: the QLoRA recipe (Dettmers et al. 2023).
COMPUTE_DTYPE = torch.bfloat16


def quantization_config(cfg: ModelConfig):
    """The ``BitsAndBytesConfig`` for ``model.quantization``, or None when it is ``none``."""
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"model.quantization={cfg.quantization} needs bitsandbytes: "
            "pip install -e '.[quant]' (bitsandbytes==0.50.2)"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=COMPUTE_DTYPE,
        # A float storage dtype lets FSDP shard the packed weights like any other tensor.
        bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage),
    )


def quantize_in_memory_model(model: PreTrainedModel, cfg: ModelConfig, device) -> PreTrainedModel:
    """Reload a model built in memory with ``model.quantization`` applied (the tiny model)."""
    with tempfile.TemporaryDirectory(prefix="multitune-quantize-") as folder:
        # Not ``model.save_pretrained``: under torchrun transformers writes its files on rank 0
        # only, and every rank quantizes its own copy. Shared (tied) tensors are saved once.
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        save_model(model, f"{folder}/model.safetensors", metadata={"format": "pt"})
        quantized = AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=quantization_config(cfg),
            dtype=model.dtype,
            device_map={"": device},
        )
    return keep_4bit_weights_in_place(quantized)


def keep_4bit_weights_in_place(model: PreTrainedModel) -> PreTrainedModel:
    """Turn off bitsandbytes' repacking of 4-bit weights for its AVX512-BF16 CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit``'s packed weight in
    place, into another layout, on its first forward without gradients in eval mode. That
    layout needs out_features divisible by 32 (the tiny model's are not: an assertion fails),
    and it changes the stored bytes under the run: the frozen base would no longer be the one
    checkpoints, FSDP shards and the merged export assume. The generic 4-bit path is used
    instead, on every CPU alike.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model

"""Build the model and tokenizer a run trains: the built-in tiny model or any hub causal LM."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from multitune.config.schema import ModelConfig
from multitune.models.gguf import converted_folder, gguf_file_of
from multitune.models.quantization import (
    keep_4bit_weights_in_place,
    quantization_config,
    quantize_in_memory_model,
)
from multitune.models.tiny import TINY_MODEL_NAME, build_tiny_model, train_tiny_tokenizer

log = logging.getLogger(__name__)

PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<pad>", "<|pad|>"]


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says what to do."""


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def resolve_attn_implementation(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model_and_tokenizer(
    cfg: ModelConfig,
    corpus: list[str],
    seed: int,
    device: torch.device,
    saved_base: Path | None = None,
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load the base model (frozen later by LoRA) and its tokenizer.

    ``corpus`` trains the built-in tokenizer; ``saved_base`` reloads a built-in model a run saved,
    so evaluating an adapter uses exactly the weights it was trained on (a quantized run saved
    its base quantized, and it reloads so). ``model.quantization`` loads the base in 4 or 8 bits.
    """
    dtype = resolve_dtype(cfg, device)
    if cfg.name == TINY_MODEL_NAME:
        if saved_base is not None and (saved_base / "config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(saved_base)
            model = AutoModelForCausalLM.from_pretrained(saved_base, dtype=dtype)
        else:
            tokenizer = train_tiny_tokenizer(corpus, cfg.tiny.tokenizer_vocab_size)
            model = build_tiny_model(cfg.tiny, tokenizer, seed).to(dtype)
            if cfg.quantization != "none":
                model = quantize_in_memory_model(model, cfg, device)
        model.config._attn_implementation = resolve_attn_implementation(cfg, device)
        keep_4bit_weights_in_place(model)  # a saved quantized base reloads quantized too
        return _to_device(model, device), tokenizer
    source = model_source(cfg, dtype)
    tokenizer = _from_hub(AutoTokenizer, cfg, source)
    quantization = quantization_config(cfg)
    model = _from_hub(
        AutoModelForCausalLM,
        cfg,
        source,
        dtype=dtype,
        attn_implementation=resolve_attn_implementation(cfg, device),
        # Quantized weights are placed as they load; they cannot be moved with .to() afterwards.
        **(
            {"quantization_config": quantization, "device_map": {"": device}}
            if quantization
            else {}
        ),
    )
    ensure_pad_token(tokenizer, model)
    keep_4bit_weights_in_place(model)
    return _to_device(model, device), tokenizer


def model_source(cfg: ModelConfig, dtype: torch.dtype) -> str:
    """What ``from_pretrained`` loads: ``model.name`` itself, or, for a GGUF model, the cached
    folder it was converted to (see ``models/gguf.py``)."""
    gguf = gguf_file_of(cfg.name, cfg.gguf_file, cfg.revision)
    return cfg.name if gguf is None else str(converted_folder(gguf, dtype))


def _to_device(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return model  # placed by from_pretrained's device_map
    return model.to(device)


def ensure_pad_token(tokenizer: Tokenizer, model: PreTrainedModel) -> None:
    """Llama 3 ships no pad token; use its reserved right-pad token, never a new embedding."""
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
        tokenizer.pad_token = pad
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _from_hub(factory, cfg: ModelConfig, source: str, **kwargs):
    # A converted GGUF folder is local: the hub revision belongs to the repo the file came from.
    revision = cfg.revision if source == cfg.name else None
    try:
        return factory.from_pretrained(
            source, revision=revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except Exception as exc:
        raise ModelLoadError(explain_hub_model_error(cfg.name, exc)) from exc


def explain_hub_model_error(name: str, exc: Exception) -> str:
    kind, text = type(exc).__name__, str(exc)
    if kind == "GatedRepoError" or "gated repo" in text.lower():
        return (
            f"{name} is a gated model: accept its license at https://huggingface.co/{name} "
            "with the account whose token you use (HF_TOKEN or `hf auth login`)"
        )
    if kind == "RepositoryNotFoundError" or "is not a valid model identifier" in text:
        return f"{name} was not found on the Hub (or it is private and no token is set)"
    if (
        "offline" in text.lower()
        or "couldn't connect" in text.lower()
        or "cannot find the requested files" in text.lower()
    ):
        return (
            f"{name} is not in the local cache and the Hub cannot be reached; download it "
            "with a network first (`hf download " + name + "`) or unset HF_HUB_OFFLINE"
        )
    return f"could not load {name}: {kind}: {text}"

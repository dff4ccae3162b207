"""Write a merged Llama-architecture checkpoint as one GGUF file for llama.cpp (and Ollama etc.).

Names and conventions follow llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``:

* Tensors are renamed (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``) and
  stored with the same numpy shape as in PyTorch; GGUF lists dimensions innermost first, so the
  file shows them reversed (a ``[out, in]`` weight reads back as ``[in, out]``).
* Rotary embeddings: HF's Llama rotates the two *halves* of each head (``rotate_half``: dimension
  ``i`` pairs with ``i + head_dim/2``), while llama.cpp's Llama rope rotates *adjacent* pairs
  (``2i`` with ``2i + 1``), as Meta's original checkpoints did. HF's own converter permuted the
  rows of ``q_proj`` and ``k_proj`` from the original layout into halves; ``permute_for_rope``
  undoes that, per head: rows ``[h, 0:d/2]`` and ``[h, d/2:d]`` are interleaved back. ``k_proj``
  uses the number of key/value heads (grouped-query attention). The attention scores are
  unchanged because q and k are permuted the same way.
* Llama 3.x "llama3" rope scaling becomes the ``rope_freqs.weight`` tensor of per-frequency
  divisors; linear scaling becomes metadata. Other scalings are refused.
* The tokenizer must be byte-level BPE with Llama 3's pre-tokenizer (``tokenizer.ggml.model`` =
  ``gpt2``, ``tokenizer.ggml.pre`` = ``llama-bpe``): the built-in tiny model and Llama 3.x.
  Anything else would tokenize differently in llama.cpp, so it is refused rather than guessed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from multitune.export import GGUF_DTYPES, ExportError
from multitune.models.tiny import LLAMA3_SPLIT_PATTERN

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# gguf.TokenType values, spelled out so this module imports without the optional gguf package.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# HF Llama tensor name (per layer, after "model.layers.{i}.") -> llama.cpp name (after "blk.{i}.").
LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def export_gguf(
    merged_dir: Path,
    dest_file: Path,
    dtype: str = "f16",
    name: str | None = None,
    tokenizer_source: Path | None = None,
) -> Path:
    """Convert the merged checkpoint in ``merged_dir`` to ``dest_file`` (GGUF, f32 or f16).

    In f16 files the 2-D weights are float16 and norms stay float32, as llama.cpp writes them.
    ``name`` (``general.name``) defaults to the folder's name. ``tokenizer_source`` is the GGUF
    file the run's base model was read from: its ``tokenizer.*`` metadata is copied verbatim, so
    the fine-tuned file tokenizes exactly as the original did in llama.cpp (for SmolLM2 its
    ``smollm`` pre-tokenizer, which transformers' GGUF reader does not carry over).
    """
    gguf = import_gguf()
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"GGUF dtype {dtype!r} is not supported; use one of {GGUF_DTYPES}")
    merged_dir, dest_file = Path(merged_dir), Path(dest_file)
    config = read_llama_config(merged_dir)
    hparams = llama_hparams(config)
    vocab = None
    if tokenizer_source is None:
        vocab = gguf_vocab(AutoTokenizer.from_pretrained(merged_dir), hparams["vocab_size"])
    tensors = llama_tensors(load_state_dict(merged_dir), hparams, dtype)

    dest_file.parent.mkdir(parents=True, exist_ok=True)
    partial = dest_file.with_name(dest_file.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or merged_dir.name)
        writer.add_file_type(
            gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        )
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_llama_metadata(writer, gguf, hparams)
        if vocab is None:
            copy_tokenizer_metadata(writer, gguf, tokenizer_source, hparams["vocab_size"])
        else:
            add_tokenizer_metadata(writer, vocab)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dest_file)
    log.info("GGUF (%s) written to %s", dtype, dest_file)
    return dest_file


def import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ExportError(
            "GGUF export needs the gguf package, a dependency of multitune: reinstall it"
        ) from exc
    return gguf


def read_llama_config(merged_dir: Path) -> dict[str, Any]:
    """config.json of a merged checkpoint; refuse anything but a plain Llama decoder."""
    path = merged_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} not found; pass a folder written by `multitune export --merged`")
    config = json.loads(path.read_text())
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or list(architectures) != list(SUPPORTED_ARCHITECTURES):
        raise ExportError(
            f"GGUF export supports Llama-architecture models only ({', '.join(SUPPORTED_ARCHITECTURES)}); "
            f"{merged_dir} is model_type={config.get('model_type')!r}, "
            f"architectures={architectures}. Use llama.cpp's convert_hf_to_gguf.py for it"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError(f"{path}: Llama variants with bias terms are not supported")
    return config


def llama_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The numbers llama.cpp reads, from a HF LlamaConfig dict (transformers 4 or 5 layout)."""
    n_head = config["num_attention_heads"]
    hidden = config["hidden_size"]
    # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta + rope_scaling.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "llama3", "linear"):
        raise ExportError(f"rope scaling {rope_type!r} is not supported by this GGUF export")
    return {
        "vocab_size": config["vocab_size"],
        "context_length": config["max_position_embeddings"],
        "embedding_length": hidden,
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": n_head,
        "head_count_kv": config.get("num_key_value_heads") or n_head,
        "head_dim": config.get("head_dim") or hidden // n_head,
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_theta": float(rope["rope_theta"]),
        "rope_type": rope_type,
        "rope": rope,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
    }


def add_llama_metadata(writer, gguf, hparams: dict[str, Any]) -> None:
    writer.add_vocab_size(hparams["vocab_size"])
    writer.add_context_length(hparams["context_length"])
    writer.add_embedding_length(hparams["embedding_length"])
    writer.add_block_count(hparams["block_count"])
    writer.add_feed_forward_length(hparams["feed_forward_length"])
    writer.add_head_count(hparams["head_count"])
    writer.add_head_count_kv(hparams["head_count_kv"])
    writer.add_rope_freq_base(hparams["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_rope_dimension_count(hparams["head_dim"])
    if hparams["head_dim"] != hparams["embedding_length"] // hparams["head_count"]:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    if hparams["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hparams["rope"]["factor"]))


def gguf_vocab(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges and special ids in llama.cpp's ``gpt2`` (byte-level BPE) form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer in the merged folder")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"the tokenizer is {model.get('type')} (byte_fallback={model.get('byte_fallback')}), "
            "not byte-level BPE; use llama.cpp's convert_hf_to_gguf.py for this model"
        )
    if split_pattern(spec.get("pre_tokenizer")) != LLAMA3_SPLIT_PATTERN:
        raise ExportError(
            "the tokenizer's pre-tokenizer is not Llama 3's, so llama.cpp would split text "
            "differently; use llama.cpp's convert_hf_to_gguf.py for this model"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(
            f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            # Embedding rows past the tokenizer (vocabulary padded for speed) get placeholders.
            tokens.append(f"[PAD{index}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(TOKEN_CONTROL if added[index].special else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        # Whether encoding adds BOS/EOS itself (Llama 3.2's does; the tiny one leaves BOS to the
        # chat template), so llama.cpp does the same.
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else None,
    }


def split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex of the Split step of a tokenizers pre-tokenizer, if it has one."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers") or [pre_tokenizer]
    for step in steps:
        if step.get("type") == "Split":
            return (step.get("pattern") or {}).get("Regex")
    return None


def add_tokenizer_metadata(writer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    if vocab["pad"] is not None:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


def copy_tokenizer_metadata(writer, gguf, source: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` key of ``source`` (another GGUF file), with its types."""
    fields = {k: f for k, f in gguf.GGUFReader(source).fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        count = None if tokens is None else len(tokens.data)
        raise ExportError(
            f"{source} lists {count} tokens but the model has {vocab_size} embeddings; it is not "
            "the file this run's base model came from"
        )
    for key, field in fields.items():
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)


def load_state_dict(merged_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no *.safetensors weights in {merged_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF "rotate half" row order -> llama.cpp "adjacent pairs" row order, per head.

    Within a head, output row ``j`` of the result is input row ``j // 2`` for even ``j`` and
    ``head_dim // 2 + j // 2`` for odd ``j``.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    return (
        weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(hparams: dict[str, Any]) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.x rope scaling, computed as llama.cpp's converter does."""
    rope, dim = hparams["rope"], hparams["head_dim"]
    freqs = 1.0 / (hparams["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def llama_tensors(
    state: dict[str, torch.Tensor], hparams: dict[str, Any], dtype: str
) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, array) for every tensor of the GGUF file, in llama.cpp's order."""
    state = dict(state)
    tensors: list[tuple[str, np.ndarray]] = []

    def add(name: str, tensor: torch.Tensor) -> None:
        # Converting as we go frees each original once popped, bounding peak memory.
        tensors.append((name, _to_numpy(tensor, dtype)))

    if hparams["rope_type"] == "llama3":
        add("rope_freqs.weight", llama3_rope_factors(hparams))
    add("token_embd.weight", _take(state, "model.embed_tokens.weight"))
    for layer in range(hparams["block_count"]):
        prefix = f"model.layers.{layer}."
        state.pop(prefix + "self_attn.rotary_emb.inv_freq", None)  # a buffer in old checkpoints
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = _take(state, prefix + hf_name)
            if hf_name == "self_attn.q_proj.weight":
                weight = permute_for_rope(weight, hparams["head_count"])
            elif hf_name == "self_attn.k_proj.weight":
                weight = permute_for_rope(weight, hparams["head_count_kv"])
            add(f"blk.{layer}.{gguf_name}", weight)
    add("output_norm.weight", _take(state, "model.norm.weight"))
    if hparams["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    else:
        add("output.weight", _take(state, "lm_head.weight"))
    if state:
        raise ExportError(f"tensors with no GGUF name: {', '.join(sorted(state))}")
    return tensors


def _take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise ExportError(f"the merged checkpoint has no tensor {name}")
    return state.pop(name)


def _to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    # Norms and rope factors stay float32 in f16 files: they are tiny and precision-sensitive.
    target = torch.float16 if dtype == "f16" and tensor.ndim >= 2 else torch.float32
    return np.ascontiguousarray(tensor.detach().to(target).numpy())

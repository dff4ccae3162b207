"""Merge a run's LoRA adapter into its base model: a plain transformers checkpoint.

The merge happens in float32 on CPU, so W + (alpha / r) * B @ A is added without bf16 rounding;
the result loads with ``AutoModelForCausalLM.from_pretrained(dest)`` and needs no PEFT.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from multitune.config.schema import ModelConfig
from multitune.export import ExportError
from multitune.hub.card import write_model_card
from multitune.models.loading import load_model_and_tokenizer
from multitune.models.tiny import TINY_MODEL_NAME

log = logging.getLogger(__name__)


def export_merged(output_dir: Path, dest: Path) -> Path:
    """Write base + adapter of the run in ``output_dir``, merged, to the new folder ``dest``.

    ``dest`` gets safetensors weights, config, generation config, the run's tokenizer and a model
    card. It is written beside ``dest`` first and renamed into place once complete.
    """
    output_dir, dest = Path(output_dir), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ExportError(f"{dest} already exists and is not empty; remove it or pick a new folder")
    model, tokenizer = load_merged_model(output_dir)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_model_card(output_dir, dest=staging, merged=True)
    if dest.exists():
        dest.rmdir()
    staging.rename(dest)
    log.info("merged model written to %s", dest)
    return dest


def load_merged_model(output_dir: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """The run's base model (float32, CPU) with its adapter merged in, and the run's tokenizer."""
    output_dir = Path(output_dir)
    adapter_dir = output_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(
            f"{adapter_dir}/adapter_config.json not found; export needs the output folder of a "
            "finished `multitune train` run"
        )
    base = load_base_model(output_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.eval()
    # The adapter folder holds the tokenizer exactly as trained (pad token included).
    return model, AutoTokenizer.from_pretrained(adapter_dir)


def load_base_model(output_dir: Path) -> PreTrainedModel:
    """The base model the run trained on, in float32 on CPU."""
    config_path = Path(output_dir) / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{config_path} not found; is {output_dir} a multitune output folder?")
    raw = yaml.safe_load(config_path.read_text()) or {}
    model_cfg = ModelConfig.model_validate({**raw.get("model", {}), "dtype": "float32"})
    saved_base = Path(output_dir) / "base_model"
    if model_cfg.name == TINY_MODEL_NAME and not (saved_base / "config.json").is_file():
        raise ExportError(
            f"{saved_base} is missing: the built-in model exists only in the run that created it"
        )
    model, _ = load_model_and_tokenizer(
        model_cfg, [], raw.get("seed", 0), torch.device("cpu"), saved_base=saved_base
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model = dequantized(model)
    return model


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """A 4-bit/8-bit base (``model.quantization``) as a plain float32 model holding the weights
    its adapter was trained against.

    Merging into the quantized layers would round W + BA back to 4 bits and lose most of the
    adapter. Each packed weight is dequantized to the dtype the quantized forward computed in
    (``bnb_4bit_compute_dtype``, bf16 for nf4; float32 for int8) and widened to float32, in a
    fresh model built from the config without its quantization (one that was loaded quantized
    cannot be saved once dequantized: transformers tries to re-pack it).
    """
    quantization = model.hf_quantizer.quantization_config
    compute = quantization.bnb_4bit_compute_dtype if quantization.load_in_4bit else torch.float32
    log.info("dequantizing the quantized base (%s) for the merge", compute)
    state = {
        k: v.to(torch.float32) for k, v in model.dequantize(dtype=compute).state_dict().items()
    }
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = model.generation_config
    return plain

"""Merge a run's LoRA adapter into its base model: a plain transformers checkpoint.

The merge happens in float32 on CPU, so W + (alpha / r) * B @ A is added without bf16 rounding;
the result loads with ``AutoModelForCausalLM.from_pretrained(dest)`` and needs no PEFT.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel
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
    return model

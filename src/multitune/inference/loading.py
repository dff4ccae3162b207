"""Load what `multitune train` or `multitune export --merged` wrote, ready to generate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitune.config.schema import DataConfig, ModelConfig
from multitune.models.loading import ensure_pad_token, load_model_and_tokenizer, pick_device


class InferenceError(ValueError):
    """The folder is neither a run's output nor a merged model; the message says what it needs."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    template_kwargs: dict  # what the chat template was rendered with in training
    run_config: dict | None  # config.yaml of the run, when the folder is a run's output
    source: Path  # the folder it was loaded from


def load_for_inference(path: Path, device: torch.device | None = None) -> LoadedModel:
    """A run's OUTPUT_DIR (base + adapter, unmerged) or a merged folder, in eval mode."""
    path = Path(path)
    device = device or pick_device()
    config_path = path / "config.yaml"
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    if (path / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        if run_config is None:
            raise InferenceError(f"{config_path} not found; is {path} a multitune output folder?")
        model_cfg = ModelConfig.model_validate(run_config.get("model", {}))
        base, _ = load_model_and_tokenizer(
            model_cfg, [], run_config.get("seed", 0), device, saved_base=path / "base_model"
        )
        model = PeftModel.from_pretrained(base, path / "adapter").to(device)
        tokenizer = AutoTokenizer.from_pretrained(path / "adapter")
    elif (path / "config.json").is_file():
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ensure_pad_token(tokenizer, model)
    else:
        raise InferenceError(
            f"{path} holds neither adapter/adapter_config.json (a `multitune train` output "
            "folder) nor config.json (a `multitune export --merged` folder)"
        )
    data = DataConfig.model_validate((run_config or {}).get("data", {}))
    model.eval()
    return LoadedModel(model, tokenizer, {"date_string": data.template_date}, run_config, path)

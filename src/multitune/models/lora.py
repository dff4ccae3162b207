"""LoRA adapters through peft, and the decoder/head split the fused loss needs."""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from multitune.config.schema import LoraConfig


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Freeze the base model and wrap the target modules with trainable LoRA adapters."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no module of this model; "
            f"linear layers it has: {', '.join(sorted(linear_module_names(model)))}"
        )
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        # A fully trained embed_tokens/lm_head of a tied model must stay one matrix, or the
        # saved adapter no longer describes a model that merges or exports correctly.
        ensure_weight_tying=bool(cfg.modules_to_save)
        and bool(getattr(model.config, "tie_word_embeddings", False)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


@contextlib.contextmanager
def adapters_disabled(model: PeftModel):
    """``model.disable_adapter()`` (the base model's outputs) that leaves every parameter's
    ``requires_grad`` as it was.

    peft freezes a trained ``modules_to_save`` copy on disabling and unfreezes it on enabling,
    which under FSDP2 lands on whichever tensors the module holds at that moment: after an
    evaluation the embedding/head group is still unsharded, so the sharded copy stayed frozen.
    Its trained embedding then dropped out of the trainable state dict (``KeyError:
    'modules_to_save.default.weight'`` saving best/) and out of the optimizer. The flags are put
    back before any forward and again on exit.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for param, flag in flags:
            param.requires_grad_(flag)

    try:
        with model.disable_adapter():
            restore()
            yield
    finally:
        restore()


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout module's probability to 0 (LoRA dropout included); returns how many.

    For preference training: the reference log-probs are scored once in eval mode (no dropout),
    so a policy trained with dropout on would score the same answers differently and the
    implicit reward would not start at 0 (TRL's DPOTrainer disables dropout for this reason).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            count += 1
    return count


def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (hidden states out) and the output projection of a causal LM.

    The training loss runs the decoder only and projects just the answer positions through the
    head, so [tokens x vocab] logits are never built for the whole batch.
    """
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings()

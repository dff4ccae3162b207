"""QLoRA with bitsandbytes on CPU: the frozen base really is 4-bit, close to full precision, and
LoRA on top of it trains."""

import bitsandbytes as bnb
import pytest
import torch
from tests.unit.test_training import examples_of_different_lengths

from multitune.config import validate_config
from multitune.config.schema import (
    LoraConfig,
    ModelConfig,
    TinyModelConfig,
    check_quantization_for_sharding,
)
from multitune.data.batching import collate
from multitune.models.lora import apply_lora
from multitune.models.quantization import quantize_in_memory_model
from multitune.models.tiny import build_tiny_model
from multitune.training.step import accumulate_gradients

CPU = torch.device("cpu")


def models(tokenizer, quantization="nf4"):
    cfg = ModelConfig(tiny=TinyModelConfig(size="nano"), quantization=quantization)
    full = build_tiny_model(cfg.tiny, tokenizer, seed=0)
    return full, quantize_in_memory_model(full, cfg, CPU)


def test_nf4_base_holds_4_bit_weights_and_stays_close_to_full_precision(tiny_tokenizer):
    full, quantized = models(tiny_tokenizer)
    linears = {n: m for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    packed = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # Every decoder projection is 4-bit; the tied output head stays a plain Linear.
    assert set(packed) == {n for n in linears if n != "lm_head"}
    for name, module in packed.items():
        weight = module.weight
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
        assert weight.dtype == torch.bfloat16  # float quant storage, shardable by FSDP
        bits = weight.numel() * weight.element_size() * 8
        assert bits == linears[name].weight.numel() * 4, name
    full_bytes = sum(m.weight.numel() * 4 for m in linears.values() if m is not full.lm_head)
    packed_bytes = sum(m.weight.numel() * m.weight.element_size() for m in packed.values())
    assert packed_bytes * 8 == full_bytes
    # bitsandbytes' in-place repacking for AVX512-BF16 CPUs is off (keep_4bit_weights_in_place):
    # on such a CPU the forward below would otherwise fail on these shapes and change the bytes.
    assert not any(m.support_avx512bf16_for_cpu for m in packed.values())

    ids = torch.tensor([examples_of_different_lengths(len(tiny_tokenizer))[3].input_ids])
    with torch.no_grad():
        reference = full(ids).logits
        logits = quantized(ids).logits.float()
    relative_error = ((logits - reference).norm() / reference.norm()).item()
    print(f"nf4 vs float32 logits: relative error {relative_error:.4f}")
    assert 0 < relative_error < 0.05


def test_int8_base_holds_8_bit_weights(tiny_tokenizer):
    _, quantized = models(tiny_tokenizer, "int8")
    packed = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert packed and all(m.weight.dtype == torch.int8 for m in packed)


def raw_bytes(param) -> torch.Tensor:
    """Bit pattern of a parameter (packed 4-bit data read as bf16 can hold NaNs)."""
    return param.data.detach().flatten().view(torch.uint8).clone()


def test_qlora_trains_and_leaves_the_4_bit_base_untouched(tiny_tokenizer):
    _, quantized = models(tiny_tokenizer)
    model = apply_lora(quantized, LoraConfig(r=8, alpha=16, dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    base = {n: raw_bytes(p) for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = [collate(examples_of_different_lengths(len(tiny_tokenizer)), 0)]
    losses = []
    for _ in range(8):
        losses.append(accumulate_gradients(model, batch, torch.ones(2), 2).loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(raw_bytes(param), base[name]), name


def test_uint8_quant_storage_is_refused_for_sharding():
    check_quantization_for_sharding(ModelConfig(quantization="nf4"))
    with pytest.raises(ValueError, match="model.quant_storage=uint8 cannot be sharded by FSDP"):
        check_quantization_for_sharding(ModelConfig(quantization="nf4", quant_storage="uint8"))
    # At config load when the strategy is explicit (auto is checked once it has chosen).
    data = {
        "tasks": [{"preset": "banking77"}],
        "model": {"quantization": "nf4", "quant_storage": "uint8"},
        "distributed": {"strategy": "fsdp"},
    }
    with pytest.raises(ValueError, match="model.quant_storage=uint8 cannot be sharded by FSDP"):
        validate_config(data)
    validate_config({**data, "distributed": {"strategy": "ddp"}})


def test_unknown_quantization_is_a_config_error(tmp_path):
    from tests.conftest import small_config_dict

    data = small_config_dict(tmp_path)
    data["model"]["quantization"] = "nf3"
    with pytest.raises(Exception, match="model.quantization"):
        validate_config(data)


def test_a_qlora_checkpoint_holds_only_the_adapters_and_restores_them(tiny_tokenizer, tmp_path):
    from multitune.checkpoint import load_checkpoint, save_checkpoint

    def trained_model():
        _, quantized = models(tiny_tokenizer)
        model = apply_lora(quantized, LoraConfig(r=4, alpha=8, dropout=0.0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, optimizer, scheduler

    model, optimizer, scheduler = trained_model()
    batch = [collate(examples_of_different_lengths(len(tiny_tokenizer)), 0)]
    accumulate_gradients(model, batch, torch.ones(2), 2)
    optimizer.step()
    # bitsandbytes adds its quantization state (absmax, quant_map, ...) to the state dict; the
    # checkpoint must leave it out like the rest of the frozen base, or it refuses to commit.
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1})
    fresh, fresh_optimizer, fresh_scheduler = trained_model()
    assert load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)["step"] == 1
    restored = dict(fresh.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, restored[name]), name


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tiny_tokenizer):
    cuda = torch.device("cuda")
    cfg = ModelConfig(tiny=TinyModelConfig(size="nano"), quantization="nf4")
    full = build_tiny_model(cfg.tiny, tiny_tokenizer, seed=0)
    model = apply_lora(quantize_in_memory_model(full, cfg, cuda), LoraConfig(r=8, alpha=16))
    packed = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert packed and all(m.weight.device.type == "cuda" for m in packed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = [collate(examples_of_different_lengths(len(tiny_tokenizer)), 0)]
    losses = []
    for _ in range(8):
        losses.append(accumulate_gradients(model, batch, torch.ones(2, device=cuda), 2).loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses


def test_packed_weights_the_gpu_policy_would_cast_are_refused(tiny_tokenizer):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from multitune.distributed.strategy import check_packed_weights

    cfg = ModelConfig(
        tiny=TinyModelConfig(size="nano"), quantization="nf4", quant_storage="float32"
    )
    full = build_tiny_model(cfg.tiny, tiny_tokenizer, seed=0)
    float32_storage = quantize_in_memory_model(full, cfg, CPU)
    gpu_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    check_packed_weights(float32_storage, MixedPrecisionPolicy())  # CPU: nothing is cast
    with pytest.raises(ValueError, match="model.quant_storage=float32 would be cast to bfloat16"):
        check_packed_weights(float32_storage, gpu_policy)
    _, bf16_storage = models(tiny_tokenizer)  # the default storage is the policy's own dtype
    check_packed_weights(bf16_storage, gpu_policy)

"""LoRA's input dropout fused into A (``models.lora.DroppedInputLinear``): same numbers as peft,
a bool mask and the shared input kept instead of float32 copies per adapted layer."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tests.unit.test_training import examples_of_different_lengths

from multitune.config.schema import LoraConfig, TinyModelConfig
from multitune.data.packing import pack
from multitune.models.lora import DroppedInputLinear, apply_lora
from multitune.models.tiny import build_tiny_model
from multitune.training.step import accumulate_gradients


def test_dropped_input_linear_applies_the_mask_peft_would_draw_and_its_gradients_check():
    linear = torch.nn.Linear(6, 3, bias=False).double()
    module = DroppedInputLinear(linear, p=0.3).train()
    x = torch.randn(2, 5, 6, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.7)
    torch.manual_seed(1)
    torch.testing.assert_close(module(x), F.linear(x * mask / 0.7, linear.weight))

    def seeded(x, weight):  # the same mask on every call gradcheck makes
        torch.manual_seed(1)
        return torch.func.functional_call(module, {"weight": weight}, (x,))

    weight = linear.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(seeded, (x, weight))
    module.eval()
    torch.testing.assert_close(module(x), F.linear(x, module.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_equals_peft_without_dropout(tiny_tokenizer, dtype):
    def model(fused: bool):
        base = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0).to(dtype)
        torch.manual_seed(0)  # the same LoRA A initialisation
        if fused:
            lora = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0))
        else:
            config = PeftLoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                target_modules=list(LoraConfig().target_modules),
            )
            lora = get_peft_model(base, config)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
        return lora.train()

    examples = examples_of_different_lengths(len(tiny_tokenizer))
    batch = pack(examples, tiny_tokenizer.pad_token_id, 64)
    results, grads = [], []
    for fused in (False, True):
        lora = model(fused)
        assert any(isinstance(m, DroppedInputLinear) for m in lora.modules()) == fused
        results.append(accumulate_gradients(lora, [batch], torch.ones(2), 2).loss)
        grads.append({n: p.grad for n, p in lora.named_parameters() if p.requires_grad})
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(results[0], results[1], **tolerance)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **tolerance)


def test_state_dict_keys_are_peft_s(tiny_tokenizer):
    base = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0)
    fused = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.1))
    base = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0)
    config = PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(LoraConfig().target_modules)
    )
    assert fused.state_dict().keys() == get_peft_model(base, config).state_dict().keys()

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
from multitune.models.lora import (
    DroppedInputLinear,
    apply_lora,
    cpu_dropout_rate,
    dropout_mask,
)
from multitune.models.tiny import build_tiny_model
from multitune.training.step import accumulate_gradients


def test_dropped_input_linear_applies_its_mask_and_its_gradients_check():
    linear = torch.nn.Linear(6, 3, bias=False).double()
    module = DroppedInputLinear(linear, p=0.3).train()
    x = torch.randn(2, 5, 6, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    mask = dropout_mask(x, cpu_dropout_rate(0.3))
    assert mask.dtype == torch.bool and mask.shape == x.shape and not mask.all()
    torch.manual_seed(1)
    expected = F.linear(x * mask / (1 - cpu_dropout_rate(0.3)), linear.weight)
    torch.testing.assert_close(module(x), expected)

    def seeded(x, weight):  # the same mask on every call gradcheck makes
        torch.manual_seed(1)
        return torch.func.functional_call(module, {"weight": weight}, (x,))

    weight = linear.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(seeded, (x, weight))
    module.eval()
    torch.testing.assert_close(module(x), F.linear(x, module.weight))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_cpu_dropout_mask_drops_at_its_rate_independently_and_unbiased(p):
    # The CPU mask reads 16-bit quarters of 64-bit random words: each element must still drop
    # independently at the rate, with neighbours (quarters of one word) uncorrelated.
    torch.manual_seed(0)
    x = torch.ones(1001, 999)  # not a multiple of 4 elements
    mask = dropout_mask(x, p).flatten().float()
    rate = cpu_dropout_rate(p)
    assert abs(rate - p) <= 2**-17
    sigma = (rate * (1 - rate) / mask.numel()) ** 0.5
    assert abs((1 - mask.mean().item()) - rate) < 5 * sigma
    for lag in (1, 2, 3, 4):  # within a word and across words
        a, b = mask[:-lag] - mask.mean(), mask[lag:] - mask.mean()
        assert abs((a * b).mean().item() / mask.var().item()) < 5 / mask.numel() ** 0.5
    module = DroppedInputLinear(torch.nn.Linear(999, 1, bias=False), p).train()
    torch.nn.init.ones_(module.weight)
    # inverted dropout: the dropped input sums to the input's sum, on average
    mean = module(x).mean().item() / 999
    assert abs(mean - 1) < 5 * (rate / (1 - rate) / x.numel()) ** 0.5
    assert not torch.equal(dropout_mask(x, p), dropout_mask(x, p))


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

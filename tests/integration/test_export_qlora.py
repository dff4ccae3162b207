"""`multitune export --merged` of an adapter trained on a 4-bit (nf4) base: the merge goes into
the dequantized base, and the result is a plain float32 checkpoint."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import yaml
from peft import PeftModel
from tests.conftest import small_config_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitune import cli
from multitune.models.quantization import keep_4bit_weights_in_place

PROBE = "Where would you keep the milk? A. fridge B. garage C. oven"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora-export")
    data = small_config_dict(root / "run", max_examples=10)
    data["model"]["quantization"] = "nf4"
    data["train"].update({"max_steps": 3, "lr": 1e-2})
    data["eval"].update({"before_training": False, "max_examples": 2})
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    assert cli.main(["train", str(config)]) == 0
    merged = root / "merged"
    assert cli.main(["export", str(root / "run"), "--merged", str(merged)]) == 0
    return root / "run", merged


def test_merge_into_a_4_bit_base_is_dequantized_base_plus_adapter(qlora_run):
    run, merged_dir = qlora_run
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    # A plain checkpoint: no quantization config, no bitsandbytes layers, float32 throughout.
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any(
        isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules()
    )
    assert all(p.dtype == torch.float32 for p in merged.parameters())

    # As multitune loads it: bitsandbytes' in-place CPU repacking off (keep_4bit_weights_in_place).
    quantized = keep_4bit_weights_in_place(AutoModelForCausalLM.from_pretrained(run / "base_model"))
    packed = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(packed, bnb.nn.Linear4bit)
    peft = PeftModel.from_pretrained(quantized, run / "adapter").eval()
    lora = peft.base_model.model.model.layers[0].self_attn.q_proj
    # W = the 4-bit weight as the quantized forward sees it (dequantized to bf16) + scale * B A.
    base = bnb.functional.dequantize_4bit(packed.weight.data, packed.weight.quant_state)
    delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    assert delta.abs().max() > 1e-4  # the adapter trained: the merge adds something
    expected = base.to(torch.bfloat16).float() + delta
    torch.testing.assert_close(
        merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6
    )

    # The merged model predicts like the quantized base + adapter it replaces.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        want = peft(ids).logits.float()
        got = merged(ids).logits
    relative = ((got - want).norm() / want.norm()).item()
    print(f"merged float32 vs 4-bit base + adapter: relative logit error {relative:.4f}")
    assert relative < 0.005  # bf16 activations in the 4-bit forward; measured 0.0006

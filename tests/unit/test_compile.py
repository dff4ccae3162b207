"""train.compile: the compiled decoder trains to the same loss and gradients as eager."""

import pytest
import torch
from tests.unit.test_training import examples_of_different_lengths, grads, lora_model

from multitune.config.schema import DataConfig
from multitune.data.formatting import TokenizedExample
from multitune.data.packing import micro_batches
from multitune.training.compile import compiled_decoder
from multitune.training.step import accumulate_gradients


@pytest.mark.slow
def test_compiled_decoder_gives_the_eager_loss_and_gradients(tiny_tokenizer):
    """aot_eager: Dynamo + AOTAutograd capture of the LoRA decoder with packed rows (where graph
    breaks and wrong guards would show). Inductor's code generation takes minutes on 2 CPU cores
    for this model; it was checked by hand (BENCHMARKS.md), not in the suite."""
    model = lora_model(tiny_tokenizer)
    examples = examples_of_different_lengths(len(tiny_tokenizer))
    # One packed micro-batch of two rows: one shape, so one compilation.
    batches = micro_batches(examples, 4, 0, DataConfig(max_seq_len=40))
    weights = torch.ones(2)

    eager = accumulate_gradients(model, batches, weights, 2)
    reference = grads(model)
    model.zero_grad()
    decoder = compiled_decoder(model, enabled=True, backend="aot_eager")
    assert compiled_decoder(model, enabled=False) is None
    compiled = accumulate_gradients(model, batches, weights, 2, decoder=decoder)

    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.task_loss_sums, eager.task_loss_sums, rtol=1e-4, atol=1e-4)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_compiled_decoder_takes_the_prefix_sharing_mask(tiny_tokenizer):
    """aot_eager with a prefix-sharing micro-batch (explicit 4D mask): the eager figures."""
    model = lora_model(tiny_tokenizer)
    prompt = list(range(30, 42))  # 12 tokens every example of the task starts with
    examples = [
        TokenizedExample(
            prompt + e.input_ids, [-100] * 12 + e.labels, 12 + e.prompt_length, 0, i, False
        )
        for i, e in enumerate(examples_of_different_lengths(len(tiny_tokenizer)))
    ]
    batches = micro_batches(examples, 4, 0, DataConfig(max_seq_len=120), prefix_lengths=[12])
    assert "node_index" in batches[0]
    weights = torch.ones(1)

    eager = accumulate_gradients(model, batches, weights, 1)
    reference = grads(model)
    model.zero_grad()
    decoder = compiled_decoder(model, enabled=True, backend="aot_eager")
    compiled = accumulate_gradients(model, batches, weights, 1, decoder=decoder)

    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-3, atol=1e-5)

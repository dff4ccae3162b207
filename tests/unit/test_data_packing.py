"""Packing must not change what is learned: a packed row equals each example run alone."""

import pytest
import torch
from tests.unit.test_training import examples_of_different_lengths, grads, lora_model

from multitune.config.schema import DataConfig
from multitune.data.batching import collate
from multitune.data.packing import micro_batches, pack
from multitune.losses.causal_lm import next_token_targets, token_losses
from multitune.models.lora import decoder_and_head
from multitune.training.step import accumulate_gradients, decoder_inputs, example_sums


def test_pack_layout_places_each_example_once_with_restarting_positions(tiny_tokenizer):
    examples = examples_of_different_lengths(len(tiny_tokenizer))  # lengths 9, 23, 14, 31
    batch = pack(examples, pad_id=0, capacity=40)
    assert batch["input_ids"].shape == (2, 40)  # {31, 9} and {23, 14}: two rows, 3 pad tokens
    assert batch["task_index"].tolist() == [e.task_index for e in examples]
    for index, example in enumerate(examples):
        where = batch["sequence_index"] == index
        assert int(where.sum()) == len(example.input_ids)
        assert batch["input_ids"][where].tolist() == example.input_ids
        assert batch["labels"][where].tolist() == example.labels
        assert batch["position_ids"][where].tolist() == list(range(len(example.input_ids)))
    padding = batch["sequence_index"] == -1
    assert int(padding.sum()) == 80 - 77 and (batch["labels"][padding] == -100).all()
    with pytest.raises(ValueError, match="example 3 has length 31, longer than the packing"):
        pack(examples, pad_id=0, capacity=30)


def test_targets_never_cross_example_borders():
    labels = torch.tensor([[-100, 5, 6, -100, 7, 8, -100]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 0]])
    assert next_token_targets(labels, positions).tolist() == [[5, 6, -100, 7, 8, -100, -100]]
    # Without the positions, the last token of the first example would predict the second's.
    assert next_token_targets(labels)[0, 2] == -100 and next_token_targets(labels)[0, 5] == -100


def per_example_losses(model, batch, one_row=False):
    decoder, head = decoder_and_head(model)
    hidden = decoder(**decoder_inputs(batch, "cpu", one_row)).last_hidden_state
    hidden = hidden.view(*batch["input_ids"].shape, -1)
    targets = next_token_targets(batch["labels"], batch.get("position_ids"))
    return example_sums(token_losses(hidden, head, targets), batch)


@pytest.mark.parametrize(
    ("attention", "one_row"),
    [("sdpa", False), ("eager", False), ("sdpa", True)],
)
def test_packed_row_losses_and_gradients_equal_each_example_alone(
    tiny_tokenizer, attention, one_row
):
    """one_row: the rows end to end with varlen borders, as flash-attention gets them on CUDA
    (here sdpa isolates the examples of that one row by its block mask)."""
    model = lora_model(tiny_tokenizer)
    model.config._attn_implementation = attention
    examples = examples_of_different_lengths(len(tiny_tokenizer))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])  # distinct, so a swapped example shows

    alone = torch.cat([per_example_losses(model, collate([e], 0)) for e in examples])
    (alone * weights).sum().backward()
    reference = grads(model)
    model.zero_grad()

    packed = per_example_losses(model, pack(examples, pad_id=0, capacity=40), one_row)
    (packed * weights).sum().backward()

    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for name, grad in grads(model).items():
        # atol 1e-5: LoRA A's gradient is one [out, tokens] @ [tokens, in] product over the
        # whole packed row; summed in that other order, an element near zero moved by 3e-6
        # (2 threads, the sdpa one-row case), as the losses are held to 1e-5 too.
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in reference.values())


def test_a_row_without_example_isolation_would_differ(tiny_tokenizer):
    """The check above can fail: concatenation with one running position leaks context."""
    model = lora_model(tiny_tokenizer)
    examples = examples_of_different_lengths(len(tiny_tokenizer))
    batch = pack(examples, pad_id=0, capacity=40)
    leaky = dict(batch, position_ids=torch.arange(40).expand(2, 40))
    alone = torch.cat([per_example_losses(model, collate([e], 0)) for e in examples])
    leaked = example_sums(
        token_losses(
            decoder_and_head(model)[0](
                input_ids=batch["input_ids"], position_ids=leaky["position_ids"], use_cache=False
            ).last_hidden_state,
            decoder_and_head(model)[1],
            next_token_targets(batch["labels"], batch["position_ids"]),
        ),
        batch,
    )
    assert not torch.allclose(leaked, alone, rtol=1e-3)


def test_packed_step_equals_padded_step(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    examples = examples_of_different_lengths(len(tiny_tokenizer))
    weights = torch.tensor([1.0, 3.0])
    padded = accumulate_gradients(
        model, micro_batches(examples, 2, 0, DataConfig(packing=False)), weights, 2
    )
    reference = grads(model)
    model.zero_grad()
    packed_batches = micro_batches(examples, 2, 0, DataConfig(max_seq_len=40))
    assert [int(len(mb["task_index"])) for mb in packed_batches] == [2, 2]
    packed = accumulate_gradients(model, packed_batches, weights, 2)

    assert packed.num_tokens == padded.num_tokens == 15
    assert packed.num_input_tokens == padded.num_input_tokens == 9 + 23 + 14 + 31
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.task_loss_sums, padded.task_loss_sums, rtol=1e-5, atol=1e-5)
    assert packed.task_token_counts.tolist() == padded.task_token_counts.tolist() == [3, 12]
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6)

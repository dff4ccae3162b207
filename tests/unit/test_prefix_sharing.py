"""Sharing each task's prompt prefix must not change what is learned: per-example losses and
LoRA gradients equal the unshared (padded or packed) micro-batch's."""

import copy

import pytest
import torch
import yaml
from tests.conftest import small_config_dict
from tests.unit.test_training import grads, lora_model

from multitune.config import ConfigError, load_config, validate_config
from multitune.config.schema import DataConfig, LoraConfig
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.data.packing import micro_batch, micro_batches, pack
from multitune.data.pipeline import load_tasks, tokenize_tasks
from multitune.data.prefix_sharing import (
    attention_segments,
    prefix_sharing_mask,
    prefixes_to_share,
    share_prefixes,
    shared_prefix_length,
)
from multitune.losses.causal_lm import token_losses
from multitune.models.lora import apply_lora, decoder_and_head
from multitune.training.step import (
    accumulate_gradients,
    decoder_inputs,
    example_sums,
    micro_batch_targets,
    sharing_mask_dtype,
)


@pytest.fixture(scope="module")
def demo_examples(tiny_tokenizer, tmp_path_factory):
    """The demo's three tasks (banking77, commonsense_qa, text_claims) tokenized with the tiny
    tokenizer's Llama 3 template, and each task's shared prefix length."""
    cfg = validate_config(small_config_dict(tmp_path_factory.mktemp("run"), max_examples=24))
    tasks = load_tasks(cfg, include_test=False)
    tokenize_tasks(tasks, tiny_tokenizer, cfg)
    examples = [t.tokenized["train"] for t in tasks]
    return examples, [shared_prefix_length(e) for e in examples]


def example(ids, answer, task=0, index=0):
    labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[len(ids) - answer :]
    return TokenizedExample(ids, labels, len(ids) - answer, task, index, False)


def assert_relative_close(actual, expected, tol=1e-5):
    """``actual`` within ``tol`` of ``expected`` relative to its norm: summation order moves
    elements near zero by more than 1e-5 of themselves (the packed-row tests saw 3e-6)."""
    error = float((actual - expected).norm() / expected.norm())
    assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"
    return error


def per_example_losses(model, batch, mask=None):
    decoder, head = decoder_and_head(model)
    inputs = decoder_inputs(batch, "cpu", mask_dtype=sharing_mask_dtype(decoder))
    if mask is not None:  # one sdpa call under this mask, not the segments of the real one
        inputs["attention_mask"] = mask
        inputs.pop("attention_segments", None)
    hidden = decoder(**inputs).last_hidden_state
    return example_sums(token_losses(hidden, head, micro_batch_targets(batch)), batch)


def test_shared_prefix_is_common_to_every_example_and_stops_before_the_answer():
    a = example([1, 2, 3, 4, 5, 6], answer=2)  # first labelled token at 4
    b = example([1, 2, 3, 9, 9, 9, 9, 9], answer=1)
    assert shared_prefix_length([a, b]) == 3
    # An example whose answer starts right after the common tokens shortens the prefix: the
    # prefix's last position predicts the first suffix token, which must not be trained on.
    c = example([1, 2, 3, 7], answer=1)
    assert shared_prefix_length([a, b, c]) == 2
    # Every example is checked, not only the first two.
    d = example([1, 8, 3, 4, 5, 6], answer=1)
    assert shared_prefix_length([a, b, d]) == 1


def test_layout_puts_each_prefix_once_with_continuing_positions():
    a = example([1, 2, 3, 4, 5, 6], answer=2, task=0, index=0)
    b = example([1, 2, 3, 9, 8], answer=1, task=0, index=1)
    c = example([7, 7, 5, 4], answer=1, task=1, index=2)  # task 1 shares nothing
    batch = share_prefixes([a, b, c], pad_id=0, capacity=16, prefix_lengths=[3, 0])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 9, 8, 7, 7, 5, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3]]
    assert batch["sequence_index"].tolist() == [[-1, -1, -1, 0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert batch["node_index"].tolist() == [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert batch["node_ancestors"].tolist() == [[True, False], [False, True]]
    targets = micro_batch_targets(batch)[0].tolist()
    assert targets == [-100, -100, -100, 5, 6, -100, 8, -100, -100, -100, 4, -100]
    # A row too short for both suffixes gives the second its own block, and prefix copy.
    split = share_prefixes([a, b], pad_id=0, capacity=7, prefix_lengths=[3, 0])
    assert sorted(split["input_ids"].tolist()) == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 8, 0]]


def test_tasks_whose_prefixes_start_alike_share_that_start_as_a_tree():
    # Tasks 0 and 1 start with the same two tokens (a chat template's system block), task 2
    # with another; each task's own prefix still comes once, behind the common part.
    a = example([1, 2, 3, 4, 5], answer=1, task=0, index=0)
    b = example([1, 2, 3, 6, 7], answer=1, task=0, index=1)
    c = example([1, 2, 8, 9, 4, 5], answer=1, task=1, index=2)
    d = example([5, 5, 6], answer=1, task=2, index=3)
    batch = share_prefixes([a, b, c, d], pad_id=0, capacity=32, prefix_lengths=[3, 4, 2])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 4, 5, 5, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 2, 3, 4, 5, 0, 1, 2]]
    assert batch["sequence_index"].tolist() == [[-1, -1, -1, 0, 0, 1, 1, -1, -1, 2, 2, -1, -1, 3]]
    assert batch["node_index"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]]
    # node 0 = [1, 2], below it 1 = [3] and 2 = [8, 9]; node 3 = [5, 5] stands alone
    assert batch["node_ancestors"].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 1],
    ]
    mask = prefix_sharing_mask(batch, "cpu")[0, 0]
    # c's suffix (position 9) sees the common start and its own prefix, not task 0's tokens
    assert mask[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    # b's suffix sees [1, 2], [3] and itself, not a's suffix
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 2, 5, 6]
    assert mask[13].nonzero().flatten().tolist() == [11, 12, 13]


def test_attention_segments_hold_every_key_the_mask_allows():
    a = example([1, 2, 3, 4, 5], answer=1, task=0, index=0)
    b = example([1, 2, 3, 6, 7], answer=1, task=0, index=1)
    c = example([1, 2, 8, 9, 4, 5], answer=1, task=1, index=2)
    d = example([5, 5, 6], answer=1, task=2, index=3)
    # One row: the tree of the test above. Two rows of 10: task 1 alone with padding, then
    # task 0 and task 2, which share no start.
    tree, two_rows = (
        share_prefixes([a, b, c, d], pad_id=0, capacity=capacity, prefix_lengths=[3, 4, 2])
        for capacity in (32, 10)
    )
    expected = {
        # node 0 = [1, 2] (no suffix of its own), 1 = [3] with a's and b's suffixes, 2 = [8, 9]
        # with c's (both see node 0), 3 = [5, 5] with d's
        "tree": [
            [
                (0, 2, [0, 1]),
                (2, 7, [0, 1, 2, 3, 4, 5, 6]),
                (7, 11, [0, 1, 7, 8, 9, 10]),
                (11, 14, [11, 12, 13]),
            ]
        ],
        "two rows": [
            [(0, 6, [0, 1, 2, 3, 4, 5]), (6, 10, None)],
            [(0, 7, [0, 1, 2, 3, 4, 5, 6]), (7, 10, [7, 8, 9])],
        ],
    }
    for name, batch in {"tree": tree, "two rows": two_rows}.items():
        mask = prefix_sharing_mask(batch, "cpu")
        segments = attention_segments(batch, mask)
        spans = [
            [(start, end, None if keys is None else keys.tolist()) for start, end, keys, _ in row]
            for row in segments
        ]
        assert spans == expected[name]
        for row, row_segments in enumerate(segments):
            for start, end, keys, part in row_segments:
                seen = mask[row, 0, start:end]
                if keys is None:  # padding sees only padding
                    assert not seen[:, batch["node_index"][row] >= 0].any()
                    continue
                assert torch.equal(part[0, 0], seen[:, keys])
                outside = torch.ones(seen.shape[1], dtype=torch.bool)
                outside[keys] = False
                assert not seen[:, outside].any()  # no key the mask allows is left out
    # A node whose tokens are not one run (not a layout share_prefixes makes): no segments.
    split = dict(tree, node_index=torch.tensor([[0, 0, 1, 0]]))
    split["sequence_index"] = torch.tensor([[-1, -1, 0, 1]])
    assert attention_segments(split, torch.ones(1, 1, 4, 4, dtype=torch.bool)) is None


def test_segmented_attention_equals_one_masked_call(tiny_tokenizer, demo_examples):
    """The per-segment sdpa calls give the one masked call's hidden states and gradients,
    on several rows with padding (a capacity below the micro-batch's tokens)."""
    examples, _ = micro_batch_cases(demo_examples)["mixed"]
    _, prefixes = demo_examples
    model = lora_model(tiny_tokenizer)
    decoder, _ = decoder_and_head(model)
    pad = tiny_tokenizer.pad_token_id
    batch = share_prefixes(examples, pad, 160, prefixes)
    assert batch["input_ids"].shape[0] >= 2 and (batch["node_index"] == -1).any()
    results = []
    for segmented in (False, True):
        model.zero_grad()
        inputs = decoder_inputs(batch, "cpu", segmented=segmented)
        assert ("attention_segments" in inputs) == segmented
        hidden = decoder(**inputs).last_hidden_state
        real = batch["node_index"] >= 0
        (hidden[real] * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        results.append((hidden[real].detach(), grads(model)))
    (dense, dense_grads), (segmented, segmented_grads) = results
    assert_relative_close(segmented, dense, tol=1e-6)
    for name, grad in segmented_grads.items():
        assert_relative_close(grad, dense_grads[name])


def test_layout_width_is_chosen_by_cost_and_keeps_the_losses(tiny_tokenizer, demo_examples):
    """With ``width_scale`` rows may outgrow ``data.max_seq_len``: one row of the demo's lumpy
    blocks holds fewer positions than rows of 256 and gives the same losses. The attention in
    segments computes the pairs of the prefix tree, not of the row, so even a narrow
    ``width_scale`` (attention dear) keeps one row: more rows would only copy prefixes."""
    (bank, qa, claims), prefixes = demo_examples
    examples = bank[:3] + qa[:3] + claims[:2]
    pad = tiny_tokenizer.pad_token_id
    data = DataConfig(max_seq_len=256)
    fixed = micro_batch(examples, pad, data, prefix_lengths=prefixes)
    chosen = micro_batch(examples, pad, data, prefix_lengths=prefixes, width_scale=1536.0)
    narrow = micro_batch(examples, pad, data, prefix_lengths=prefixes, width_scale=50.0)
    assert fixed["input_ids"].shape[0] > 1 and chosen["input_ids"].shape[0] == 1
    assert chosen["input_ids"].numel() < fixed["input_ids"].numel()
    assert torch.equal(narrow["input_ids"], chosen["input_ids"])
    model = lora_model(tiny_tokenizer)
    reference = per_example_losses(model, micro_batch(examples, pad, data))
    for batch in (chosen, narrow):
        torch.testing.assert_close(per_example_losses(model, batch), reference, rtol=1e-5, atol=0)


def test_share_prefix_auto_true_false_and_flash_attention():
    prefixes, means = [40, 10, 1], [63.0, 63.0, 63.0]
    assert prefixes_to_share("auto", "sdpa", prefixes, means) == [40, 0, 0]
    assert prefixes_to_share(True, "sdpa", prefixes, means) == [40, 10, 0]
    assert prefixes_to_share(False, "sdpa", prefixes, means) == [0, 0, 0]
    assert prefixes_to_share("auto", "flash_attention_2", prefixes, means) == [0, 0, 0]
    with pytest.raises(ValueError, match="share_prefix: true needs a custom attention mask"):
        prefixes_to_share(True, "flash_attention_2", prefixes, means)


def test_share_prefix_true_with_flash_attention_is_a_config_error(tmp_path):
    raw = small_config_dict(tmp_path)
    raw["data"]["share_prefix"] = True
    raw["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash_attention_2 cannot take"):
        validate_config(raw)
    raw["data"]["share_prefix"] = "yes"
    raw["model"]["attn_implementation"] = "sdpa"
    with pytest.raises(ConfigError, match="share_prefix"):
        validate_config(raw)
    # Dotted overrides read true/false/auto as YAML does.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(small_config_dict(tmp_path)))
    for value, expected in [("true", True), ("false", False), ("auto", "auto")]:
        assert load_config(path, [f"data.share_prefix={value}"]).data.share_prefix == expected
    with pytest.raises(ConfigError, match="flash_attention_2 cannot take"):
        load_config(path, ["data.share_prefix=true", "model.attn_implementation=flash_attention_2"])


def test_a_task_sharing_only_its_first_token_runs_unshared(tiny_tokenizer):
    a = example([1, 2, 3, 4, 5, 6], answer=2)
    b = example([1, 9, 3, 4, 5], answer=1, index=1)
    prefix = shared_prefix_length([a, b])
    assert prefix == 1
    (shared,) = prefixes_to_share(True, "sdpa", [prefix], [5.5])
    assert shared == 0
    data = DataConfig(max_seq_len=16)
    batch = micro_batch([a, b], 0, data, prefix_lengths=[shared])
    assert "node_index" not in batch
    for key, value in pack([a, b], 0, 16).items():
        assert torch.equal(batch[key], value)


def micro_batch_cases(demo_examples):
    (bank, qa, claims), prefixes = demo_examples
    return {
        "padded": (bank[:4], DataConfig(packing=False, max_seq_len=1024)),
        "packed": (claims[:5], DataConfig(max_seq_len=1024)),
        "mixed": (
            [bank[4], qa[0], claims[5], bank[5], qa[1], claims[6]],
            DataConfig(max_seq_len=1024),
        ),
    }


@pytest.mark.parametrize("case", ["padded", "packed", "mixed"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_losses_and_gradients_equal_unshared(tiny_tokenizer, demo_examples, case, attention):
    examples, data = micro_batch_cases(demo_examples)[case]
    _, prefixes = demo_examples
    assert min(p for p in prefixes) >= 20  # the template's system block, at least
    model = lora_model(tiny_tokenizer)
    model.config._attn_implementation = attention
    pad = tiny_tokenizer.pad_token_id
    weights = torch.arange(1.0, len(examples) + 1)  # distinct, so a swapped example shows

    plain = micro_batch(examples, pad, data)
    unshared = per_example_losses(model, plain)
    (unshared * weights).sum().backward()
    reference = grads(model)
    model.zero_grad()

    batch = micro_batch(examples, pad, data, prefix_lengths=prefixes)
    assert batch["input_ids"].shape[0] == 1
    # Each prefix token is computed once: as many as the distinct starts of the tasks'
    # prefixes (the tasks' common system block once), plus every example's suffix.
    heads = {tuple(e.input_ids[: prefixes[e.task_index]]) for e in examples}
    starts = {head[:k] for head in heads for k in range(1, len(head) + 1)}
    suffixes = sum(len(e.input_ids) - prefixes[e.task_index] for e in examples)
    assert int((batch["node_index"] >= 0).sum()) == len(starts) + suffixes
    shared = per_example_losses(model, batch)
    (shared * weights).sum().backward()

    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=0)
    for name, grad in grads(model).items():
        assert_relative_close(grad, reference[name])
    assert all(g.abs().sum() > 0 for g in reference.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_window_step_equals_unshared(tiny_tokenizer, demo_examples, checkpointing):
    """accumulate_gradients: token-exact loss, per-task sums and token counts are unchanged
    (with gradient checkpointing too, whose recomputed forward gets the same mask)."""
    (bank, qa, claims), prefixes = demo_examples
    examples = bank[:3] + qa[:3] + claims[:2] + bank[3:5]
    model = lora_model(tiny_tokenizer)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    weights = torch.tensor([1.0, 2.0, 0.5])
    pad = tiny_tokenizer.pad_token_id
    data = DataConfig(max_seq_len=1024)

    plain = accumulate_gradients(model, micro_batches(examples, 4, pad, data), weights, 3)
    reference = grads(model)
    model.zero_grad()
    batches = micro_batches(examples, 4, pad, data, prefix_lengths=prefixes)
    shared = accumulate_gradients(model, batches, weights, 3)

    assert shared.num_tokens == plain.num_tokens
    assert shared.num_input_tokens < plain.num_input_tokens  # the prefixes counted once
    torch.testing.assert_close(shared.loss, plain.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared.task_loss_sums, plain.task_loss_sums, rtol=1e-5, atol=0)
    assert shared.task_token_counts.tolist() == plain.task_token_counts.tolist()
    for name, grad in grads(model).items():
        assert_relative_close(grad, reference[name])


def test_a_leaky_mask_would_differ(tiny_tokenizer, demo_examples):
    """The equality above can fail: suffixes that see each other change the losses."""
    (_, _, claims), prefixes = demo_examples
    model = lora_model(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    batch = micro_batch(claims[:3], pad, DataConfig(max_seq_len=1024), prefix_lengths=prefixes)
    # Causal within each prefix node only: a suffix also sees the suffixes before it.
    node = batch["node_index"]
    width = node.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    leaky = (causal & (node[:, :, None] == node[:, None, :]))[:, None]
    leaky_losses = per_example_losses(model, batch, mask=leaky)
    shared = per_example_losses(model, batch)
    # By far more than the equality tests' 1e-5 (measured: 7e-4 to 2e-3 relative).
    assert not torch.allclose(leaky_losses, shared, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_shared_losses_and_gradients_equal_unshared_on_smollm2(smollm2, tmp_path):
    base, tokenizer = smollm2
    cfg = validate_config(small_config_dict(tmp_path, max_examples=12))
    tasks = load_tasks(cfg, include_test=False)
    tokenize_tasks(tasks, tokenizer, cfg)
    per_task = [t.tokenized["train"] for t in tasks]
    prefixes = [shared_prefix_length(e) for e in per_task]
    examples = per_task[0][:3] + per_task[1][:2] + per_task[2][:3]
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    pad = tokenizer.pad_token_id
    data = DataConfig(max_seq_len=512)
    weights = torch.arange(1.0, len(examples) + 1)
    assert prefixes[0] > 100 and prefixes[2] > 40  # system block, instruction, label list

    unshared = per_example_losses(model, micro_batch(examples, pad, data))
    (unshared * weights).sum().backward()
    reference = grads(model)
    model.zero_grad()
    shared = per_example_losses(model, micro_batch(examples, pad, data, prefix_lengths=prefixes))
    (shared * weights).sum().backward()

    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=0)
    for name, grad in grads(model).items():
        assert_relative_close(grad, reference[name])

"""The loop's arithmetic on the real tiny model: token-exact accumulation, loss falls, reload."""

import json

import pytest
import torch
from tests.conftest import small_config_dict

from multitune.config import validate_config
from multitune.config.schema import LoraConfig, TinyModelConfig
from multitune.data.batching import collate
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample
from multitune.losses.causal_lm import next_token_targets, token_losses
from multitune.models.lora import apply_lora, decoder_and_head
from multitune.models.tiny import build_tiny_model
from multitune.training.step import accumulate_gradients


def lora_model(tokenizer, dropout=0.0):
    model = build_tiny_model(TinyModelConfig(size="nano"), tokenizer, seed=0)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    # Non-zero B so the adapters contribute and get gradients in both factors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def examples_of_different_lengths(vocab: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (length, answer) in enumerate([(9, 2), (23, 5), (14, 1), (31, 7)]):
        ids = torch.randint(20, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length - answer) + ids[length - answer :]
        out.append(TokenizedExample(ids, labels, length - answer, i % 2, i, False))
    return out


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_1x4_equals_4x1_on_examples_of_different_lengths(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    examples = examples_of_different_lengths(len(tiny_tokenizer))
    pad = tiny_tokenizer.pad_token_id
    weights = torch.ones(2)

    one_batch = accumulate_gradients(model, [collate(examples, pad)], weights, 2)
    reference = grads(model)
    model.zero_grad()
    four_micro = accumulate_gradients(model, [collate([e], pad) for e in examples], weights, 2)
    accumulated = grads(model)

    assert one_batch.num_tokens == four_micro.num_tokens == 15
    torch.testing.assert_close(one_batch.loss, four_micro.loss, rtol=1e-5, atol=1e-6)
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in reference.values())
    # Per-task sums cover every answer token exactly once.
    assert four_micro.task_token_counts.tolist() == [2 + 1, 5 + 7]
    torch.testing.assert_close(four_micro.task_loss_sums.sum() / 15, four_micro.loss)


def test_token_losses_equal_plain_cross_entropy_over_full_logits(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    batch = collate(examples_of_different_lengths(len(tiny_tokenizer)), tiny_tokenizer.pad_token_id)
    decoder, head = decoder_and_head(model)
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = next_token_targets(batch["labels"])
    ours = token_losses(hidden, head, targets)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modules_to_save", [[], ["embed_tokens"]])
def test_step_through_fused_op_equals_plain_full_logits_loss_and_gradients(
    tiny_tokenizer, modules_to_save
):
    """The plain stack: full model forward, [B, T, V] logits, HF's own mean cross-entropy."""
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=0)
    model = apply_lora(model, LoraConfig(r=4, dropout=0.0, modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    batch = collate(examples_of_different_lengths(len(tiny_tokenizer)), 0)

    ours = accumulate_gradients(model, [batch], torch.ones(2), 2)
    fused = grads(model)
    model.zero_grad()
    plain = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    ).loss
    plain.backward()

    torch.testing.assert_close(ours.loss, plain.detach(), rtol=1e-5, atol=1e-6)
    reference = grads(model)
    assert len(reference) == len(fused) > 0
    for name, grad in reference.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-7)
    # With the tied embedding trained, its gradient includes the head's, from inside the op.
    trained = [n for n in fused if "modules_to_save" in n]
    assert len(trained) == len(modules_to_save)


def test_all_masked_batch_gives_zero_loss_and_finite_gradients(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    decoder, head = decoder_and_head(model)
    ids = torch.randint(20, 100, (2, 6))
    hidden = decoder(input_ids=ids).last_hidden_state
    losses = token_losses(hidden, head, torch.full((2, 6), IGNORE_INDEX))
    losses.sum().backward()
    assert losses.abs().sum() == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="holds no answer tokens"):
        masked = TokenizedExample([5, 6, 7], [IGNORE_INDEX] * 3, 3, 0, 0, False)
        accumulate_gradients(model, [collate([masked], 0)], torch.ones(1), 1)


def test_sft_run_loss_falls_and_adapter_reloads_with_same_results(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multitune.data.pipeline import load_tasks, tokenize_tasks
    from multitune.evaluation.runner import evaluate_tasks
    from multitune.recipes import sft

    data = small_config_dict(tmp_path / "run", max_examples=80)
    data["train"].update({"epochs": 3, "log_every_steps": 3})
    data["eval"]["before_training"] = False
    cfg = validate_config(data)
    results = sft.run(cfg)
    out = cfg.output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], [r["loss"] for r in train]

    # A fresh process's view: base + saved adapter + saved tokenizer score exactly as the
    # in-memory model did at the end of training (same logits -> same loss and predictions).
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter"
    )
    tasks = load_tasks(cfg)
    tokenize_tasks(tasks, tokenizer, cfg)
    again = evaluate_tasks(model, tokenizer, tasks, cfg)
    for name, metrics in results["tasks"].items():
        assert again[name]["n"] == metrics["n"] == 16
        assert again[name]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
        assert again[name]["accuracy"] == metrics["accuracy"]
    with model.disable_adapter():
        base = evaluate_tasks(model, tokenizer, tasks, cfg, with_predictions=False)
    assert all(base[n]["loss"] > again[n]["loss"] + 0.5 for n in again)

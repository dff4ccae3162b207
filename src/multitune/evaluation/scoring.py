"""Score a model on tokenized examples: answer-token loss, constrained labels, choice letters."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from multitune.data.batching import collate, left_pad
from multitune.data.formatting import IGNORE_INDEX, TokenizedExample, chat_pieces
from multitune.distributed.process_group import all_ranks_done, most_over_ranks
from multitune.evaluation.label_trie import LabelTrie, constrained_greedy_step
from multitune.losses.causal_lm import next_token_targets, token_logprobs, token_losses
from multitune.models.lora import decoder_and_head


def by_length(
    examples: list[TokenizedExample], batch_size: int
) -> Iterator[list[TokenizedExample]]:
    """Batches of similar length (longest first), so padding wastes little compute."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


def lockstep_batches(
    examples: list[TokenizedExample], batch_size: int, device
) -> list[list[TokenizedExample] | None]:
    """``by_length`` batches, padded with None up to the most any rank has.

    Sharded layers all-gather in every forward, so every rank must run as many; a rank given
    fewer examples runs a throwaway forward for each None. In one process: the batches.
    """
    batches = list(by_length(examples, batch_size))
    return batches + [None] * (most_over_ranks(len(batches), device) - len(batches))


@torch.no_grad()
def answer_loss(
    model: torch.nn.Module, examples: list[TokenizedExample], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Mean loss and perplexity over all answer tokens (token-weighted, like training)."""
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in by_length(examples, batch_size):
        tensors = collate(batch, pad_id)
        hidden = decoder(
            input_ids=tensors["input_ids"].to(device),
            attention_mask=tensors["attention_mask"].to(device),
            use_cache=False,
        ).last_hidden_state
        targets = next_token_targets(tensors["labels"]).to(device)  # the fused op, as in training
        total += token_losses(hidden, head, targets).sum().item()
        count += int((targets != -100).sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict) -> int:
    """The token the chat template closes an assistant turn with (``<|eot_id|>`` on Llama 3)."""
    pieces = chat_pieces(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        tokenizer,
        template_kwargs,
    )
    if not pieces[-1].tail:
        raise ValueError("the chat template closes an assistant turn with no token")
    return pieces[-1].tail[0]


def label_trie(
    tokenizer: PreTrainedTokenizerBase, names: tuple[str, ...], end_id: int
) -> LabelTrie:
    sequences = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in names]
    return LabelTrie.from_token_sequences(sequences, end_id, label_names=list(names))


def _prompt_forward(model, prompts: list[list[int]], pad_id: int, device, use_cache=True):
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # Left padding: positions count real tokens only, as they did in training.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=use_cache,
        logits_to_keep=1,  # only the next-token distribution is read: no [B, T, vocab] logits
    )
    return out, mask, positions


@torch.no_grad()
def constrained_labels(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    trie: LabelTrie,
    batch_size: int,
    pad_id: int,
) -> dict[int, int]:
    """Greedy decoding restricted to the label set; returns example index -> label index.

    A prefix trie over the labels' token sequences (each ended by the end-of-turn token) masks
    every other token at each step, so even an untrained model can only produce a valid label.
    Decoding runs batched with the KV cache over left-padded prompts.
    """
    device = next(model.parameters()).device
    predictions = {}
    for batch in lockstep_batches(examples, batch_size, device):
        # A throwaway one-token prompt keeps a rank without examples in step with the others.
        prompts = [[pad_id]] if batch is None else [e.input_ids[: e.prompt_length] for e in batch]
        out, mask, positions = _prompt_forward(model, prompts, pad_id, device)
        cache, generated = out.past_key_values, [[] for _ in prompts]
        logits = out.logits[:, -1, :]
        while True:
            step = constrained_greedy_step(logits.float(), generated, trie)
            for row, token in enumerate(step.tolist()):
                ended = generated[row] and generated[row][-1] == trie.end_token_id
                if not ended and len(generated[row]) < trie.max_sequence_length:
                    generated[row].append(token)
            done = all(
                g[-1] == trie.end_token_id or len(g) >= trie.max_sequence_length for g in generated
            )
            # Every rank decodes until the last one is done (its labels may be longer): a rank
            # that stopped early would leave the others' all-gathers without a partner.
            if all_ranks_done(done, device):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=step.view(-1, 1).to(device),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1, :]
        for example, sequence in zip(batch or [], generated):
            predictions[example.example_index] = trie.label_index(sequence)
    return predictions


@torch.no_grad()
def choice_letters(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    candidates: dict[int, tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    pad_id: int,
) -> dict[int, int]:
    """Multiple choice in one forward pass per question: the highest-scoring choice letter.

    Reads the next-token distribution at the answer position and compares the first token of
    each letter; no generation. Returns example index -> choice index.
    """
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    first_token = {}  # letter -> its first token id; a handful of letters, tokenized once
    predictions = {}
    for batch in by_length(examples, batch_size):
        ids, mask = left_pad([e.input_ids[: e.prompt_length] for e in batch], pad_id)
        last = decoder(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            # Left padding: positions count real tokens only, as they did in training.
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
            use_cache=False,
        ).last_hidden_state[:, -1]
        # Each letter's log-probability at the answer position through the fused op: one
        # hidden row per (question, letter), never the [batch, vocab] logits.
        rows, letter_ids = [], []
        for row, example in enumerate(batch):
            for letter in candidates[example.example_index]:
                if letter not in first_token:
                    first_token[letter] = tokenizer(letter, add_special_tokens=False)["input_ids"][
                        0
                    ]
                rows.append(row)
                letter_ids.append(first_token[letter])
        scores = token_logprobs(
            last[rows].unsqueeze(0), head, torch.tensor([letter_ids], device=device)
        )[0].tolist()
        start = 0
        for example in batch:
            count = len(candidates[example.example_index])
            choice_scores = scores[start : start + count]
            predictions[example.example_index] = choice_scores.index(max(choice_scores))
            start += count
    return predictions


@torch.no_grad()
def choice_text_scores(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    choice_texts: dict[int, tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    pad_id: int,
) -> dict[int, list[float]]:
    """Length-normalised log-likelihood of each choice's full text as the answer.

    Each choice text is appended to the question's prompt (tokenized as the answer content would
    be) and scored by the mean log-prob of its tokens, so long choices are not penalised for
    their length. A question's prompt runs once; its KV cache is copied to one row per choice and
    the choice tokens of every row run in one more pass, right-padded, positions continuing the
    prompt's. About ``batch_size`` choice rows go through each pass. Returns example index ->
    one score per choice.
    """
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    encoded: dict[str, list[int]] = {}
    most_choices = max(len(choice_texts[e.example_index]) for e in examples)
    scores = {}
    for batch in by_length(examples, max(1, batch_size // most_choices)):
        ids, mask = left_pad([e.input_ids[: e.prompt_length] for e in batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        # log p(first answer token) comes from the prompt's last position.
        first = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)
        owners, answers = [], []
        for question, example in enumerate(batch):
            for text in choice_texts[example.example_index]:
                if text not in encoded:
                    encoded[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
                owners.append(question)
                answers.append(encoded[text])
        index = torch.tensor(owners, device=device)
        cache = out.past_key_values
        cache.reorder_cache(index)  # one copy of the question's cache per choice row
        width = max(len(a) for a in answers)
        choice_ids = torch.full((len(answers), width), pad_id, dtype=torch.long)
        choice_mask = torch.zeros((len(answers), width), dtype=torch.long)
        targets = torch.full((len(answers), width), IGNORE_INDEX, dtype=torch.long)
        for row, answer in enumerate(answers):
            choice_ids[row, : len(answer)] = torch.tensor(answer)
            choice_mask[row, : len(answer)] = 1
            targets[row, : len(answer) - 1] = torch.tensor(answer[1:])  # position k predicts k+1
        hidden = decoder(
            input_ids=choice_ids.to(device),
            attention_mask=torch.cat([mask[index], choice_mask.to(device)], dim=1),
            position_ids=positions[index, -1:] + 1 + torch.arange(width, device=device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        rest = token_logprobs(hidden, head, targets.to(device)).sum(-1)
        first_ids = torch.tensor([a[0] for a in answers], device=device)
        totals = first[index, first_ids] + rest
        lengths = torch.tensor([len(a) for a in answers], device=device)
        row = 0
        for example in batch:
            count = len(choice_texts[example.example_index])
            scores[example.example_index] = (
                totals[row : row + count] / lengths[row : row + count]
            ).tolist()
            row += count
    return scores


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    tokenizer: PreTrainedTokenizerBase,
    end_id: int,
    batch_size: int,
    max_new_tokens: int,
) -> dict[int, str]:
    """Batched greedy generation with the KV cache over left-padded prompts.

    Returns example index -> generated text (up to the end-of-turn token).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    texts = {}
    for batch in lockstep_batches(examples, batch_size, device):
        prompts = [[pad_id]] if batch is None else [e.input_ids[: e.prompt_length] for e in batch]
        ids, mask = left_pad(prompts, pad_id)
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=pad_id,
            # Under a process group a rank whose rows all ended keeps running forwards until
            # every rank's have (sharded layers all-gather in each one).
            synced_gpus=dist.is_available() and dist.is_initialized(),
        )
        for example, row in zip(batch or [], output[:, ids.shape[1] :].tolist()):
            if end_id in row:
                row = row[: row.index(end_id)]
            texts[example.example_index] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts

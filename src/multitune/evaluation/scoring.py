"""Score a model on tokenized examples: answer-token loss, constrained labels, choice letters."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from multitune.data.formatting import IGNORE_INDEX, TokenizedExample, chat_pieces
from multitune.distributed.process_group import all_ranks_done, most_over_ranks
from multitune.evaluation.label_trie import LabelTrie, constrained_greedy_step
from multitune.evaluation.shared_prefix import (
    labelled_rows_forward,
    most_shared_tokens,
    prompt_batch,
    real_token_positions,
)
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
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    batch_size: int,
    pad_id: int,
    share_prefix: bool = True,
) -> dict[str, float]:
    """Mean loss and perplexity over all answer tokens (token-weighted, like training).
    ``share_prefix``: the prompts' common prefix runs once per batch (``shared_prefix``), the
    rest of each row (right-padded) continues from its cache."""
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in by_length(examples, batch_size):
        hidden, targets = labelled_rows_forward(decoder, batch, pad_id, device, share_prefix)
        total += token_losses(hidden, head, targets).sum().item()  # the fused op, as in training
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


def _prompt_and_gold_forward(
    model, batch: list[TokenizedExample], pad_id: int, device, share_prefix: bool
):
    """One forward over every example's prompt (left-padded) followed by its gold answer
    (right-padded): the answer tokens' summed loss, and the next-token logits, KV cache, mask
    and positions at the prompt's end, where decoding starts.

    Left padding puts every prompt's last token in the same column, so cropping the cache to
    the prompt columns leaves exactly the prompts' keys and values: the answer columns come
    after, and causal attention kept them out of every prompt position. With ``share_prefix``
    the prompts' common prefix ran once before (``prompt_batch``) and this forward continues
    from its cache.
    """
    decoder, head = decoder_and_head(model)
    prompts = [e.input_ids[: e.prompt_length] for e in batch]
    prompt = prompt_batch(decoder, prompts, pad_id, device, share_prefix, most_shared_tokens(batch))
    num_shared, ids = len(prompt.shared), prompt.ids
    width = max(len(e.input_ids) - e.prompt_length for e in batch)
    answer_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), ids.shape[1] + width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        answer = example.input_ids[example.prompt_length :]
        answer_ids[row, : len(answer)] = torch.tensor(answer)
        answer_mask[row, : len(answer)] = 1
        start = ids.shape[1] - (example.prompt_length - num_shared)
        own_labels = example.labels[num_shared:]
        labels[row, start : start + len(own_labels)] = torch.tensor(own_labels)
    full_mask = torch.cat([prompt.mask, answer_mask], dim=1).to(device)
    own_positions = real_token_positions(full_mask)[:, num_shared:]
    out = decoder(
        input_ids=torch.cat([ids, answer_ids], dim=1).to(device),
        attention_mask=full_mask,
        position_ids=own_positions,
        past_key_values=prompt.cache,
        use_cache=True,
    )
    hidden, cache = out.last_hidden_state, out.past_key_values
    targets = next_token_targets(labels).to(device)
    loss_sum = token_losses(hidden, head, targets).sum()
    prompt_width = ids.shape[1]
    logits = head(hidden[:, prompt_width - 1])
    cache.crop(-width)  # transformers 5: a negative count of trailing columns to drop
    return (
        logits,
        cache,
        full_mask[:, : num_shared + prompt_width],
        own_positions[:, :prompt_width],
        loss_sum,
        int((targets != IGNORE_INDEX).sum()),
    )


def _throwaway_example(pad_id: int) -> TokenizedExample:
    return TokenizedExample([pad_id, pad_id], [IGNORE_INDEX, IGNORE_INDEX], 1, 0, -1, False)


@torch.no_grad()
def constrained_labels(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    trie: LabelTrie | dict[int, LabelTrie],
    batch_size: int,
    pad_id: int,
    share_prefix: bool = True,
) -> tuple[dict[int, int], dict[str, float]]:
    """Greedy decoding restricted to the label set: (example index -> label index, the gold
    answers' mean loss and perplexity, as ``answer_loss`` gives them).

    A prefix trie over the labels' token sequences (each ended by the end-of-turn token) masks
    every other token at each step, so even an untrained model can only produce a valid label.
    ``trie`` is one trie for all examples (classification), or example index -> its own trie
    (a multiple-choice question's choice texts). Decoding runs batched with the KV cache over
    left-padded prompts. The forward pass that reads the prompts also reads the gold answers
    behind them, so the answer loss costs no pass of its own. ``share_prefix``: run the prompts'
    common prefix once per batch (``shared_prefix``); the predictions are the same either way.
    """
    device = next(model.parameters()).device
    predictions, loss_sum, loss_tokens = {}, 0.0, 0
    first_trie = trie if isinstance(trie, LabelTrie) else next(iter(trie.values()))
    for batch in lockstep_batches(examples, batch_size, device):
        # A throwaway example (one pad prompt token, nothing labelled) keeps a rank without
        # examples in step with the others.
        rows = batch or [_throwaway_example(pad_id)]
        tries = [
            trie[e.example_index] if isinstance(trie, dict) and batch else first_trie for e in rows
        ]
        end_id = first_trie.end_token_id
        logits, cache, mask, positions, batch_loss, batch_tokens = _prompt_and_gold_forward(
            model, rows, pad_id, device, share_prefix
        )
        loss_sum, loss_tokens = loss_sum + batch_loss.item(), loss_tokens + batch_tokens
        generated = [[] for _ in rows]
        while True:
            step = constrained_greedy_step(logits.float(), generated, tries)
            for row, token in enumerate(step.tolist()):
                if not generated[row] or generated[row][-1] != end_id:
                    generated[row].append(token)
            # Once every row can only become one label (usually after its first token), the
            # rest is forced and needs no forward pass. Every rank decodes until the last one
            # is done (its labels may be longer): a rank that stopped early would leave the
            # others' all-gathers without a partner.
            rests = [t.forced_completion(g) for t, g in zip(tries, generated)]
            if all_ranks_done(all(rest is not None for rest in rests), device):
                for sequence, rest in zip(generated, rests):
                    sequence += rest
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
        for example, sequence, row_trie in zip(batch or [], generated, tries):
            predictions[example.example_index] = row_trie.label_index(sequence)
    loss = loss_sum / max(loss_tokens, 1)
    return predictions, {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def choice_letters(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    candidates: dict[int, tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    pad_id: int,
    share_prefix: bool = True,
) -> dict[int, int]:
    """Multiple choice in one forward pass per question: the highest-scoring choice letter.

    Reads the next-token distribution at the answer position and compares the first token of
    each letter; no generation. Returns example index -> choice index. ``share_prefix``: run
    the prompts' common prefix once per batch (``shared_prefix``).
    """
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    first_token = {}  # letter -> its first token id; a handful of letters, tokenized once
    predictions = {}
    for batch in by_length(examples, batch_size):
        prompts = [e.input_ids[: e.prompt_length] for e in batch]
        prompt = prompt_batch(decoder, prompts, pad_id, device, share_prefix)
        mask = prompt.mask.to(device)
        last = decoder(
            input_ids=prompt.ids.to(device),
            attention_mask=mask,
            position_ids=real_token_positions(mask)[:, len(prompt.shared) :],
            past_key_values=prompt.cache,
            use_cache=prompt.cache is not None,
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
    share_prefix: bool = True,
) -> dict[int, list[float]]:
    """Length-normalised log-likelihood of each choice's full text as the answer.

    Each choice text is appended to the question's prompt (tokenized as the answer content would
    be) and scored by the mean log-prob of its tokens, so long choices are not penalised for
    their length. A question's prompt runs once; its KV cache is copied to one row per choice and
    the choice tokens of every row run in one more pass, right-padded, positions continuing the
    prompt's. About ``batch_size`` choice rows go through each pass. Returns example index ->
    one score per choice. ``share_prefix``: the questions' common prefix runs once per batch
    (``shared_prefix``).
    """
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    encoded: dict[str, list[int]] = {}
    most_choices = max(len(choice_texts[e.example_index]) for e in examples)
    scores = {}
    for batch in by_length(examples, max(1, batch_size // most_choices)):
        prompts = [e.input_ids[: e.prompt_length] for e in batch]
        prompt = prompt_batch(decoder, prompts, pad_id, device, share_prefix)
        mask = prompt.mask.to(device)
        own_positions = real_token_positions(mask)[:, len(prompt.shared) :]
        out = decoder(
            input_ids=prompt.ids.to(device),
            attention_mask=mask,
            position_ids=own_positions,
            past_key_values=prompt.cache,
            use_cache=True,
        )
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
            position_ids=own_positions[index, -1:] + 1 + torch.arange(width, device=device),
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
    share_prefix: bool = True,
) -> dict[int, str]:
    """Batched greedy generation with the KV cache over left-padded prompts.

    Returns example index -> generated text (up to the end-of-turn token). ``share_prefix``:
    the prompts' common prefix runs once per batch (``shared_prefix``) and generation starts
    from its cache.
    """
    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    texts = {}
    for batch in lockstep_batches(examples, batch_size, device):
        prompts = [[pad_id]] if batch is None else [e.input_ids[: e.prompt_length] for e in batch]
        prompt = prompt_batch(decoder, prompts, pad_id, device, share_prefix)
        # generate takes the whole rows (it skips the columns the cache holds) and derives the
        # positions from the mask, pads between prefix and row included.
        shared = torch.tensor(prompt.shared, dtype=torch.long).expand(len(prompts), -1)
        ids = torch.cat([shared, prompt.ids], dim=1)
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=prompt.mask.to(device),
            past_key_values=prompt.cache,
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

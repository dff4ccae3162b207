"""Evaluation of an FSDP-sharded model on 2 gloo processes whose decoding stops at different
points (other labels, other example counts, other generation lengths): every rank runs the
same forwards, so it completes, and each rank's results equal one process's; with each batch's
shared prompt prefix run once too (the ranks agree on when)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import TEMPLATE_KWARGS, free_port
from tests.unit.test_scoring import tokenized
from tests.unit.test_shared_prefix import decoder_forwards

from multitune.config.schema import LoraConfig, TinyModelConfig
from multitune.evaluation.scoring import (
    constrained_labels,
    end_of_turn_id,
    greedy_generate,
    label_trie,
)

pytestmark = pytest.mark.distributed
WORLD_SIZE = 2
BATCH_SIZE = 2
# Per rank: label names (one-token vs several-token labels), prompts, generation length.
LABELS = [("Claim", "card"), ("card_arrival", "Not a Claim", "card_linking")]
PROMPTS = [[f"text {i} " * (i + 1) for i in range(3)], [f"other {i} " * (i + 2) for i in range(7)]]
NEW_TOKENS = [2, 7]


def model_for_evaluation(tokenizer):
    """The tiny model with a fresh LoRA adapter, as a run evaluates it."""
    from multitune.models.lora import apply_lora
    from multitune.models.tiny import build_tiny_model

    model = build_tiny_model(TinyModelConfig(size="nano"), tokenizer, seed=3)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    return model.eval()


def evaluate(model, tokenizer, rank: int, share_prefix: bool = True) -> dict:
    end_id = end_of_turn_id(tokenizer, TEMPLATE_KWARGS)
    pad = tokenizer.pad_token_id
    examples = tokenized(tokenizer, PROMPTS[rank], ["card"] * len(PROMPTS[rank]))
    trie = label_trie(tokenizer, LABELS[rank], end_id)
    labels, _ = constrained_labels(model, examples, trie, BATCH_SIZE, pad, share_prefix)
    texts = greedy_generate(
        model, examples, tokenizer, end_id, BATCH_SIZE, NEW_TOKENS[rank], share_prefix
    )
    return {"labels": labels, "texts": texts}


def evaluate_both_ways(model, tokenizer, rank: int) -> dict:
    """``evaluate`` with the prompt prefix shared and not, and the decoder forwards of each."""
    record = {}
    for share in (True, False):
        with decoder_forwards(model) as calls:
            results = evaluate(model, tokenizer, rank, share)
        record[str(share)] = {"results": results, "forwards": len(calls)}
    return record


def _worker(rank: int, port: int, tokenizer, out: Path, run=evaluate) -> None:
    from multitune.distributed.process_group import DistContext
    from multitune.distributed.strategy import apply_strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: ranks out of step fail the test in a minute instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        ctx = DistContext(rank, WORLD_SIZE, rank, WORLD_SIZE, torch.device("cpu"), True)
        model = model_for_evaluation(tokenizer)
        apply_strategy(model, "fsdp", ctx)
        (out / f"rank{rank}.json").write_text(json.dumps(run(model, tokenizer, rank)))
    finally:
        dist.destroy_process_group()


def test_ranks_that_stop_decoding_at_different_points_stay_in_step(tmp_path, tiny_tokenizer):
    mp.spawn(_worker, args=(free_port(), tiny_tokenizer, tmp_path), nprocs=WORLD_SIZE)
    model = model_for_evaluation(tiny_tokenizer)
    steps = []
    for rank in range(WORLD_SIZE):
        sharded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        alone = json.loads(json.dumps(evaluate(model, tiny_tokenizer, rank)))  # str keys
        assert sharded == alone, rank
        assert len(sharded["labels"]) == len(PROMPTS[rank])
        tokens = [
            len(tiny_tokenizer(LABELS[rank][i], add_special_tokens=False)["input_ids"])
            for i in sharded["labels"].values()
        ]
        steps.append(max(tokens))
    # The ranks really stopped at different points: their labels differ in length.
    assert steps[0] < steps[1], steps


def test_ranks_share_prompt_prefixes_in_step(tmp_path, tiny_tokenizer):
    mp.spawn(
        _worker,
        args=(free_port(), tiny_tokenizer, tmp_path, evaluate_both_ways),
        nprocs=WORLD_SIZE,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for rank, record in enumerate(ranks):
        assert record["True"]["results"] == record["False"]["results"], rank
    # Every rank ran as many forwards as the other, each way; sharing added one prefix forward
    # per scorer in the first batch only: both ranks had 2 rows there, while later batches
    # find a rank with one row or none (nothing to share), so both ranks skip it.
    assert ranks[0]["True"]["forwards"] == ranks[1]["True"]["forwards"]
    assert ranks[0]["False"]["forwards"] == ranks[1]["False"]["forwards"]
    assert ranks[0]["True"]["forwards"] == ranks[0]["False"]["forwards"] + 2

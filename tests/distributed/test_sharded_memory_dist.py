"""The memory a sharded model holds equals the plan's count: 2 gloo processes, fsdp, the tiny
model with tied embeddings, plain LoRA and a trained embedding (lora.modules_to_save)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import free_port

from multitune.config.schema import DistributedConfig, LoraConfig, ModelConfig, TinyModelConfig

pytestmark = pytest.mark.distributed
WORLD_SIZE = 2
LORAS = {
    "lora": LoraConfig(r=4, alpha=8, dropout=0.0),
    "trained_embedding": LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["embed_tokens"]),
}


def held_elements(model) -> tuple[int, int]:
    """(elements, bytes) of the parameters this rank holds, each Parameter once."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(t.numel() for t in local), sum(t.numel() * t.element_size() for t in local)


def _worker(rank: int, port: int, tokenizer, out: Path) -> None:
    from multitune.distributed.process_group import DistContext
    from multitune.distributed.strategy import distribute
    from multitune.models.lora import apply_lora
    from multitune.models.tiny import build_tiny_model
    from multitune.planning.parameters import count_parameters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        ctx = DistContext(rank, WORLD_SIZE, rank, WORLD_SIZE, torch.device("cpu"), True)
        found = {}
        for name, lora in LORAS.items():
            for untied in (False, True):
                model = build_tiny_model(TinyModelConfig(size="nano"), tokenizer, seed=0)
                counts = count_parameters(model.config, lora)
                model = apply_lora(model, lora)
                if untied:  # what the recipes did before: the frozen head its own Parameter
                    head = model.get_output_embeddings()
                    original = getattr(head, "original_module", head)
                    original.weight = torch.nn.Parameter(original.weight.detach(), False)
                distribute(model, DistributedConfig(strategy="fsdp"), ModelConfig(), ctx)
                held = torch.tensor(held_elements(model))
                dist.all_reduce(held)
                found[f"{name}/{'untied' if untied else 'tied'}"] = {
                    "elements": held.tolist()[0],
                    "bytes": held.tolist()[1],
                    "planned": counts.total,
                    "embedding": model.config.vocab_size * model.config.hidden_size,
                }
        if rank == 0:
            (out / "held.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_sharded_tied_model_holds_the_planned_parameters_once(tmp_path, tiny_tokenizer):
    mp.spawn(_worker, args=(free_port(), tiny_tokenizer, tmp_path), nprocs=WORLD_SIZE)
    held = json.loads((tmp_path / "held.json").read_text())
    for name in LORAS:
        tied = held[f"{name}/tied"]
        # Over both ranks, every parameter the plan counts, once, in float32 on CPU.
        assert tied["elements"] == tied["planned"], name
        assert tied["bytes"] == 4 * tied["planned"], name
        # A head with its own Parameter (the old workaround) holds the embedding twice.
        untied = held[f"{name}/untied"]
        assert untied["elements"] == tied["planned"] + tied["embedding"], name

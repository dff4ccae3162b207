"""`multitune plan`: parameter counts against peft, memory/strategy arithmetic, the CLI path."""

import json
import math
import os
from argparse import ArgumentParser
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from multitune.config.schema import LoraConfig, ModelConfig, RunConfig  # noqa: E402
from multitune.planning import (  # noqa: E402
    add_plan_arguments,
    build_plan,
    cmd_plan,
    count_dataset_tokens,
    format_plan,
)
from multitune.planning.architecture import (  # noqa: E402
    ArchitectureError,
    resolve_architecture,
    shape_of,
)
from multitune.planning.communication import communication_per_step  # noqa: E402
from multitune.planning.hardware import (  # noqa: E402
    CPU_ALLOCATOR_ACTIVATION_RETENTION,
    CPU_ALLOCATOR_WEIGHT_RETENTION,
    CPU_PROCESS_BYTES,
    GPUS,
)
from multitune.planning.memory import (  # noqa: E402
    MemoryModel,
    activation_memory,
    loss_memory,
    micro_batch_candidates,
)
from multitune.planning.parameters import (  # noqa: E402
    analytic_parameter_counts,
    count_parameters,
)

REPO = Path(__file__).resolve().parents[2]
LLAMA_1B = "meta-llama/Llama-3.2-1B-Instruct"


def run_config(name: str = LLAMA_1B, **sections) -> RunConfig:
    # build_plan never reads the tasks; the dataset is a placeholder.
    return RunConfig.model_validate(
        {
            "model": {"name": name, **sections.pop("model", {})},
            "tasks": [{"name": "t", "kind": "chat", "dataset": "unused"}],
            **sections,
        }
    )


def small_llama(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize(
    "name, base",
    [
        ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400),
        ("meta-llama/Llama-3.2-3B", 3_212_749_824),
        ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
    ],
)
def test_known_llama_parameter_counts_match_published_sizes(name, base):
    arch = resolve_architecture(ModelConfig(name=name))
    lora = LoraConfig(target_modules=["q_proj"])
    assert arch.source == "built-in table"
    assert count_parameters(arch.config, lora).base == base
    assert analytic_parameter_counts(arch.shape, lora).base == base


LORA_SETTINGS = [
    LoraConfig(),
    LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=4, target_modules=["down_proj"], modules_to_save=["lm_head"]),
    LoraConfig(r=4, modules_to_save=["embed_tokens"]),
    LoraConfig(r=2, target_modules=["lm_head", "o_proj"]),
    LoraConfig(r=2, target_modules=["embed_tokens", "gate_proj"]),
    LoraConfig(r=3, modules_to_save=["lm_head", "embed_tokens"]),
]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", LORA_SETTINGS, ids=range(len(LORA_SETTINGS)))
def test_closed_form_lora_counts_equal_peft_on_meta_model(lora, tied):
    config = small_llama(tied)
    assert count_parameters(config, lora) == analytic_parameter_counts(shape_of(config), lora)


def test_closed_form_equals_peft_for_llama_1b_default_lora():
    arch = resolve_architecture(ModelConfig(name=LLAMA_1B))
    lora = LoraConfig(r=16)
    counts = count_parameters(arch.config, lora)
    assert counts == analytic_parameter_counts(arch.shape, lora)
    # 16 layers x r 16 x sum(in + out) = 16 x 16 x (4096 + 2560 + 2560 + 4096 + 3 x 10240)
    assert counts.trainable == 11_272_192


def test_tiny_model_vocab_is_an_upper_bound_and_said_so():
    cfg = ModelConfig(tiny={"size": "nano", "tokenizer_vocab_size": 1000, "vocab_size": 4096})
    arch = resolve_architecture(cfg)
    assert (arch.shape.hidden, arch.shape.layers, arch.shape.vocab) == (64, 2, 4096)
    assert any("upper bound" in note for note in arch.notes)


def test_local_config_json_is_read(tmp_path):
    small_llama(tied=False).save_pretrained(tmp_path)
    arch = resolve_architecture(ModelConfig(name=str(tmp_path / "config.json")))
    assert arch.shape == shape_of(small_llama(tied=False))


def test_unknown_model_offline_names_the_built_in_ones(monkeypatch):
    # The constant is read at import; another test module may have imported it already.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ArchitectureError, match="Llama-3.2-1B.*builtin:tiny-llama"):
        resolve_architecture(ModelConfig(name="nobody/not-a-model-xyz"))


def test_sharding_orders_weights_fsdp_below_hsdp_below_ddp():
    plan = build_plan(run_config(), 4, "h100", None, None, nodes=2)
    memory = {s: plan["memory"][s] for s in ("ddp", "hsdp", "fsdp")}
    base_bytes = 2 * 1_235_814_400
    assert memory["ddp"]["weights"] == base_bytes
    assert memory["hsdp"]["weights"] == base_bytes / 4  # sharded within a node of 4
    assert memory["fsdp"]["weights"] == base_bytes / 8  # sharded over all 8
    for line in ("adapter", "gradients", "optimizer"):
        assert memory["fsdp"][line] < memory["hsdp"][line] < memory["ddp"][line]
    # Activations do not depend on the strategy; gathering does.
    assert len({m["activations"] for m in memory.values()}) == 1
    assert memory["ddp"]["gathered_params"] == 0 < memory["fsdp"]["gathered_params"]
    for lines in memory.values():
        assert lines["total"] == sum(
            v for k, v in lines.items() if k not in ("total", "fits", "max_micro_batch")
        )


def test_largest_micro_batch_grows_with_gpu_memory():
    cfg = run_config("meta-llama/Llama-3.2-3B", data={"max_seq_len": 2048})
    by_memory = sorted(GPUS.values(), key=lambda gpu: gpu.memory_bytes)
    largest = [
        build_plan(cfg, 1, gpu.name, None, None)["memory"]["ddp"]["max_micro_batch"]
        for gpu in by_memory
    ]
    for key in ("no_checkpointing", "checkpointing"):
        sizes = [entry[key] for entry in largest]
        assert sizes == sorted(sizes)
        assert sizes[-1] > sizes[0]
    assert all(e["checkpointing"] >= e["no_checkpointing"] for e in largest)


def test_micro_batch_search_covers_powers_of_two_and_midpoints():
    assert micro_batch_candidates(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def test_recommendation_replicates_small_models_and_shards_large_ones():
    small = build_plan(run_config(), 8, "h100", None, None)
    assert small["recommendation"]["strategy"] == "ddp"
    # 16384: with the fused loss (one logits chunk) and LoRA keeping each layer input once (not
    # a float32 copy per adapted layer), an 8B at 8192 tokens already fits one A10G.
    big = run_config("meta-llama/Llama-3.1-8B-Instruct", data={"max_seq_len": 16384})
    one_node = build_plan(big, 8, "a10g", None, None)
    assert one_node["recommendation"]["strategy"] == "fsdp"
    two_nodes = build_plan(big, 8, "a10g", None, None, nodes=2)
    assert two_nodes["recommendation"]["strategy"] == "hsdp"
    assert any("gradient_checkpointing=true" in a for a in two_nodes["recommendation"]["advice"])


def test_communication_formulas():
    params, grads = 1000, 80
    ddp = communication_per_step("ddp", params, grads, 4, 1, grad_accum=3)
    assert ddp["bytes_per_gpu"] == round(2 * 3 / 4 * grads)  # once per step, not per micro-batch
    fsdp = communication_per_step("fsdp", params, grads, 4, 1, grad_accum=3)
    assert fsdp["bytes_per_gpu"] == round(3 * (2 * 3 / 4 * params + 3 / 4 * grads))
    hsdp = communication_per_step("hsdp", params, grads, 4, 2, grad_accum=1)
    assert hsdp["intra_node_bytes"] == round(2 * 3 / 4 * params + 3 / 4 * grads)
    assert hsdp["inter_node_bytes"] == round(2 * 1 / 2 * grads / 4)
    assert communication_per_step("ddp", params, grads, 1, 1, 1)["bytes_per_gpu"] == 0


def test_time_and_cost_scale_with_tokens_and_gpus():
    cfg = run_config(train={"epochs": 3})
    one = build_plan(cfg, 1, "h100", 2.0, num_tokens=1_000_000)
    eight = build_plan(cfg, 8, "h100", 2.0, num_tokens=1_000_000)
    flops = one["compute"]["flops_per_token"]
    expected_epoch = 1_000_000 * flops / (989e12 * 0.35)
    assert one["time"]["epoch_seconds"] == pytest.approx(expected_epoch)
    assert one["time"]["total_seconds"] == pytest.approx(3 * expected_epoch)
    assert eight["time"]["epoch_seconds"] == pytest.approx(expected_epoch / 8)
    assert eight["cost"]["total"] == pytest.approx(one["cost"]["total"])  # same GPU-hours
    assert one["cost"]["total"] == pytest.approx(3 * expected_epoch / 3600 * 2.0)
    # 4N frozen + 6T trainable dominate for a 1B model at 1024 tokens.
    compute = one["compute"]
    matmul = 4 * compute["frozen_matmul_params"] + 6 * compute["trainable_matmul_params"]
    assert matmul < flops < 1.1 * matmul


def test_activation_formula_matches_tensors_saved_by_autograd():
    """The per-layer formula against what a real tiny model keeps for backward (CPU, fp32).

    Also the guard of the LoRA dropout fix: with peft's own dropout (a float32 mask and a
    float32 dropped copy per adapted layer) the model keeps about 20% more than predicted."""
    from multitune.models.lora import apply_lora
    from multitune.models.tiny import build_tiny_model, train_tiny_tokenizer

    cfg = run_config(
        "builtin:tiny-llama",
        model={"tiny": {"size": "nano", "tokenizer_vocab_size": 300, "vocab_size": 512}},
        data={"max_seq_len": 64},
    )
    tokenizer = train_tiny_tokenizer([f"row {i} of text" for i in range(50)], 300)
    model = apply_lora(build_tiny_model(cfg.model.tiny, tokenizer, seed=0), cfg.lora)
    model.config._attn_implementation = "sdpa"
    model.train()
    batch, seq = 4, 64
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -1] = 0  # padding, as in real batches
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        ids = torch.randint(10, 300, (batch, seq))
        model.get_base_model().model(input_ids=ids, attention_mask=mask)
    arch = resolve_architecture(cfg.model)
    memory_model = MemoryModel(
        shape=arch.shape,
        counts=count_parameters(arch.config, cfg.lora),
        lora=cfg.lora,
        weight_bytes=4,
        attention="sdpa",
        seq_len=seq,
        overhead_bytes=0,
    )
    predicted = activation_memory(memory_model, batch, checkpointing=False)
    assert predicted == pytest.approx(sum(saved.values()), rel=0.1)


def test_plan_is_json_serialisable_and_formats():
    plan = build_plan(run_config(), 2, "a100-40gb", 1.5, num_tokens=5_000_000, num_examples=9000)
    assert json.loads(json.dumps(plan)) == plan
    text = format_plan(plan)
    assert "recommended" in text and "fsdp" in text and "$" in text
    assert plan["time"]["steps_per_epoch"] == math.ceil(9000 / (8 * 1 * 2))


def write_tiny_dataset(folder: Path) -> Path:
    import datasets

    folder.mkdir(parents=True)
    names = ["billing", "delivery", "refund"]
    rows = {
        "text": [f"question number {i} about my {names[i % 3]}" for i in range(60)],
        "label": [i % 3 for i in range(60)],
    }
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "train.parquet")
    return folder


def plan_args(*argv: str):
    parser = ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    add_plan_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_plan_json_counts_tokens_and_caches_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    demo = REPO / "configs" / "demo-tiny.yaml"
    if all((REPO / "data" / "sample" / t).is_dir() for t in ("banking77", "commonsense_qa")):
        config = demo
    else:  # the bundled sample is generated by a script; fall back to a file of our own
        data = write_tiny_dataset(tmp_path / "data")
        config = tmp_path / "plan.yaml"
        config.write_text(
            "model: {name: 'builtin:tiny-llama'}\n"
            f"tasks: [{{name: intents, kind: classification, dataset: {data}}}]\n"
        )
    args = plan_args(str(config), "--gpu-type", "cpu", "--json")
    assert cmd_plan(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["name"] == "builtin:tiny-llama"
    assert plan["time"]["num_tokens_per_epoch"] > plan["time"]["num_examples_per_epoch"] > 0
    assert plan["recommendation"]["strategy"] == "ddp"
    cached = list((tmp_path / "cache" / "multitune" / "token_counts").glob("*.json"))
    assert len(cached) == 1

    # The second plan reads the cached count instead of loading the data again.
    def no_loading(*_args, **_kwargs):
        raise AssertionError("data loaded again despite the cache")

    monkeypatch.setattr("multitune.planning.tokens.load_tasks", no_loading)
    assert cmd_plan(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["time"] == plan["time"]


def test_token_count_matches_the_tokenized_examples(tmp_path):
    from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
    from multitune.models.loading import load_model_and_tokenizer

    data = write_tiny_dataset(tmp_path / "data")
    cfg = run_config(
        "builtin:tiny-llama",
        tasks=[{"name": "intents", "kind": "classification", "dataset": str(data)}],
    )
    counts = count_dataset_tokens(cfg, cache_dir=tmp_path / "cache")
    tasks = load_tasks(cfg, include_test=False)
    _, tokenizer = load_model_and_tokenizer(
        cfg.model, training_corpus(tasks), cfg.seed, torch.device("cpu")
    )
    tokenize_tasks(tasks, tokenizer, cfg)
    train = tasks[0].tokenized["train"]
    assert counts["num_examples"] == len(train) == 48  # 60 rows minus the 20% validation split
    assert counts["num_example_tokens"] == sum(len(e.input_ids) for e in train)
    assert counts["vocab_size"] == len(tokenizer)
    # data.share_prefix auto: one task, micro batch 8 -> 6 micro-batches compute the shared
    # prefix once each instead of 48 times.
    prefix = counts["per_task"]["intents"]["shared_prefix_tokens"]
    assert prefix == tasks[0].shared_prefix > 20
    assert counts["num_tokens"] == counts["num_example_tokens"] - prefix * (48 - 6)
    unshared = RunConfig.model_validate({**cfg.model_dump(), "data": {"share_prefix": False}})
    off = count_dataset_tokens(unshared, cache_dir=tmp_path / "cache")
    assert off["num_tokens"] == off["num_example_tokens"] == counts["num_example_tokens"]


def test_token_count_with_tasks_starting_alike_matches_the_layout(tmp_path):
    """Two tasks whose prompts start alike (here the same data, so wholly): the plan's count
    equals the tokens the prefix-sharing layout computes over the epoch, one row per
    micro-batch, the common start of the second task's prefix not computed again."""
    from multitune.data.mixing import epoch_order, task_probabilities
    from multitune.data.packing import micro_batches
    from multitune.data.pipeline import (
        choose_prefix_sharing,
        load_tasks,
        tokenize_tasks,
        training_corpus,
    )
    from multitune.models.loading import load_model_and_tokenizer
    from multitune.training.step import count_input_tokens

    data = write_tiny_dataset(tmp_path / "data")
    cfg = run_config(
        "builtin:tiny-llama",
        tasks=[
            {"name": name, "kind": "classification", "dataset": str(data)}
            for name in ("first", "second")
        ],
    )
    counts = count_dataset_tokens(cfg, cache_dir=tmp_path / "cache")
    tasks = load_tasks(cfg, include_test=False)
    _, tokenizer = load_model_and_tokenizer(
        cfg.model, training_corpus(tasks), cfg.seed, torch.device("cpu")
    )
    tokenize_tasks(tasks, tokenizer, cfg)
    choose_prefix_sharing(tasks, cfg, "sdpa")
    sizes = [len(t.tokenized["train"]) for t in tasks]
    order = epoch_order(sizes, task_probabilities(sizes, cfg.data, [1.0, 1.0]), cfg.seed, 0)
    examples = [tasks[t].tokenized["train"][i] for t, i in order]
    batches = micro_batches(
        examples,
        cfg.train.micro_batch_size,
        tokenizer.pad_token_id,
        cfg.data,
        cfg.seed,
        [t.prefix_to_share for t in tasks],
        width_scale=float("inf"),  # attention free: every micro-batch in one row
    )
    assert all(mb["input_ids"].shape[0] == 1 for mb in batches)
    assert counts["num_tokens"] == sum(count_input_tokens(mb) for mb in batches)
    first, second = (counts["per_task"][name] for name in ("first", "second"))
    assert first["shared_prefix_tokens"] == second["shared_prefix_tokens"] > 20
    # identical prefixes: each micro-batch computes the one prefix once, whichever task has it
    prefix = first["shared_prefix_tokens"]
    computed = sum(
        p["num_tokens"] - (p["num_example_tokens"] - prefix * p["num_examples"])
        for p in (first, second)
    )
    assert computed == prefix * len(batches)


def test_packed_micro_batch_fills_only_the_rows_its_examples_need():
    cfg = run_config(data={"max_seq_len": 256})
    arch = resolve_architecture(cfg.model)
    counts = count_parameters(arch.config, cfg.lora)

    def model(**kw) -> MemoryModel:
        return MemoryModel(arch.shape, counts, cfg.lora, 2, "sdpa", 256, 0, **kw)

    assert model().positions(8) == 8 * 256  # unknown lengths: every row full
    assert model(example_tokens=103.0).positions(8) == 4 * 256  # 824 tokens -> 4 rows
    assert model(example_tokens=103.0, packing=False).positions(8) == 8 * 256
    assert model(example_tokens=400.0).positions(8) == 8 * 256  # never above micro x seq
    # shared prefixes under sdpa: one row as wide as the tokens (57.5 a example computed)
    assert model(example_tokens=57.5, free_width=True).positions(8) == 460
    full, answers = model(example_tokens=103.0), model(example_tokens=103.0, answer_fraction=0.05)
    assert loss_memory(answers, 8, fused=True) == math.ceil(1024 * 0.05) * arch.shape.vocab * 4
    assert loss_memory(full, 8, fused=True) == 1024 * arch.shape.vocab * 4


def test_cpu_plan_counts_the_process_and_the_allocator_s_kept_blocks():
    cfg = run_config(data={"max_seq_len": 256})
    plan = build_plan(cfg, 1, "cpu", None, num_tokens=103_000, num_examples=1000)
    lines = plan["memory"]["ddp"]
    assert lines["overhead"] == CPU_PROCESS_BYTES
    kept = CPU_ALLOCATOR_WEIGHT_RETENTION * lines["weights"]
    kept += CPU_ALLOCATOR_ACTIVATION_RETENTION * lines["activations"]
    assert lines["allocator"] == math.ceil(kept)
    assert plan["batch"]["positions_per_micro_batch"] == 4 * 256
    shared = build_plan(
        cfg, 1, "cpu", None, num_tokens=57_500, num_examples=1000, num_example_tokens=103_000
    )
    assert shared["batch"]["positions_per_micro_batch"] == 8 * 57.5
    eager = run_config(data={"max_seq_len": 256}, model={"attn_implementation": "eager"})
    eager_plan = build_plan(
        eager, 1, "cpu", None, num_tokens=57_500, num_examples=1000, num_example_tokens=103_000
    )
    assert eager_plan["batch"]["positions_per_micro_batch"] == 2 * 256  # rows of max_seq_len
    gpu = build_plan(cfg, 1, "h100", None, num_tokens=103_000, num_examples=1000)
    assert gpu["memory"]["ddp"]["allocator"] == 0

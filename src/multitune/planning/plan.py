"""``build_plan``: memory, strategy, time and cost of a run, before renting anything."""

from __future__ import annotations

import math

from multitune.config.schema import RunConfig
from multitune.planning.architecture import resolve_architecture
from multitune.planning.communication import communication_per_step
from multitune.planning.hardware import (
    CPU_ALLOCATOR_ACTIVATION_RETENTION,
    CPU_ALLOCATOR_WEIGHT_RETENTION,
    USABLE_MEMORY_FRACTION,
    get_accelerator,
)
from multitune.planning.memory import (
    DTYPE_BYTES,
    NF4_BYTES_PER_PARAM,
    STRATEGIES,
    MemoryModel,
    activation_memory,
    largest_micro_batch,
    loss_memory,
    recompute_memory,
    strategy_memory,
)
from multitune.planning.parameters import count_parameters, matmul_parameters
from multitune.planning.throughput import (
    DEFAULT_MFU,
    flops_per_token,
    steps_per_epoch,
    training_time,
)

GB = 1e9
# The training loss goes through ops.linear_cross_entropy (chunked, answer positions only), so
# the plan counts one chunk of logits; `alternatives.loss_plain` is the unfused figure.
FUSED = True
GIB = 1024**3


def build_plan(
    cfg: RunConfig,
    gpus: int,
    gpu_type: str,
    price_per_gpu_hour: float | None,
    num_tokens: int | None,
    nodes: int = 1,
    mfu: float = DEFAULT_MFU,
    num_examples: int | None = None,
    num_answer_tokens: int | None = None,
    num_example_tokens: int | None = None,
) -> dict:
    """Estimate a run of ``cfg`` on ``nodes`` x ``gpus`` devices of ``gpu_type``; JSON-ready.

    ``gpus`` is per node. ``num_tokens`` (training tokens per epoch, see
    ``count_dataset_tokens``) enables time and cost; ``num_examples`` also steps per epoch and
    ``train.max_steps``, and with ``num_tokens`` the rows a packed micro-batch fills;
    ``num_answer_tokens`` the rows the fused loss projects; ``num_example_tokens`` above
    ``num_tokens`` (shared prompt prefixes) lays micro-batches out as sdpa's shared rows. Nothing is downloaded beyond, at most, a hub config.json.
    """
    if gpus < 1 or nodes < 1:
        raise ValueError(f"need at least one GPU and one node (got gpus={gpus}, nodes={nodes})")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    arch = resolve_architecture(cfg.model)
    shape = arch.shape
    counts = count_parameters(arch.config, cfg.lora, cfg.model.trust_remote_code)
    device = get_accelerator(gpu_type)
    world = gpus * nodes
    dtype = device.default_dtype if cfg.model.dtype == "auto" else cfg.model.dtype
    attention = cfg.model.attn_implementation
    notes = list(arch.notes)
    if attention == "auto":
        attention = "sdpa"
        if gpu_type != "cpu":
            notes.append(
                "attention assumed sdpa; with flash-attn installed (attn_implementation auto) "
                "K/V are not repeated and no padding mask is built, so activations are lower"
            )
    model = MemoryModel(
        shape=shape,
        counts=counts,
        lora=cfg.lora,
        weight_bytes=DTYPE_BYTES[dtype],
        attention=attention,
        seq_len=cfg.data.max_seq_len,
        overhead_bytes=device.overhead_bytes,
        # With the data's token count, a packed micro-batch fills only the rows it needs.
        example_tokens=num_tokens / num_examples if num_tokens and num_examples else None,
        packing=cfg.data.packing,
        # Shared prefixes under sdpa: rows as wide as the cost model chooses (one row on the
        # demo), so no row rounding (data.prefix_sharing._capacities).
        free_width=attention == "sdpa"
        and bool(num_tokens and num_example_tokens and num_tokens < num_example_tokens),
        answer_fraction=num_answer_tokens / num_tokens if num_answer_tokens and num_tokens else 1.0,
        allocator_retention=(
            (CPU_ALLOCATOR_WEIGHT_RETENTION, CPU_ALLOCATOR_ACTIVATION_RETENTION)
            if gpu_type == "cpu"
            else (0.0, 0.0)
        ),
    )
    usable = int(device.memory_bytes * USABLE_MEMORY_FRACTION)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    checkpointing = cfg.model.gradient_checkpointing

    memory = memory_by_strategy(model, usable, micro, checkpointing, gpus, nodes)
    communication = {
        strategy: communication_per_step(
            strategy,
            param_bytes=model.weight_bytes * counts.base + model.trainable_bytes,
            grad_bytes=model.trainable_bytes,
            gpus_per_node=gpus,
            nodes=nodes,
            grad_accum=accum,
        )
        for strategy in STRATEGIES
    }
    if world == 1:
        notes.append("one device: ddp, hsdp and fsdp are the same (nothing is sharded)")
    elif nodes == 1:
        notes.append("one node: hsdp shards over the node, so it equals fsdp")

    linear_params = shape.layers * sum(i * o for i, o in shape.linear_shapes().values())
    frozen_matmul, trainable_matmul = matmul_parameters(shape, cfg.lora)
    plan = {
        "model": arch.describe(),
        "parameters": {
            **counts.as_dict(),
            "trainable_percent": 100 * counts.trainable / counts.total,
            "lora": {"r": cfg.lora.r, "target_modules": list(cfg.lora.target_modules)},
        },
        "hardware": {
            **device.as_dict(),
            "gpus_per_node": gpus,
            "nodes": nodes,
            "world_size": world,
            "usable_memory_bytes": usable,
            "weight_dtype": dtype,
            "attention": attention,
        },
        "batch": {
            "micro_batch_size": micro,
            "grad_accum": accum,
            "max_seq_len": cfg.data.max_seq_len,
            "gradient_checkpointing": checkpointing,
            "tokens_per_step": micro * accum * world * cfg.data.max_seq_len,
            "positions_per_micro_batch": model.positions(micro),
        },
        "memory": memory,
        "alternatives": {
            "activations_checkpointing": activation_memory(model, micro, True)
            + recompute_memory(model, micro, True),
            "activations_no_checkpointing": activation_memory(model, micro, False),
            "loss_plain": loss_memory(model, micro, fused=False),
            # decoder linears in nf4, embeddings/head/norms in bf16
            "weights_nf4": round(
                NF4_BYTES_PER_PARAM * linear_params + 2 * (counts.base - linear_params)
            ),
        },
        "communication": communication,
        "recommendation": recommend(
            memory, communication, micro, accum, checkpointing, gpus, nodes
        ),
        "compute": {
            "frozen_matmul_params": frozen_matmul,
            "trainable_matmul_params": trainable_matmul,
            "flops_per_token": flops_per_token(
                frozen_matmul,
                trainable_matmul,
                shape.layers,
                cfg.data.max_seq_len,
                shape.q_dim,
                checkpointing,
            ),
            "mfu": mfu,
        },
        "time": None,
        "cost": None,
        "notes": notes,
    }
    if num_tokens is not None:
        plan["time"] = plan_time(plan, cfg, num_tokens, num_examples, world, device.peak_tflops)
        if price_per_gpu_hour is not None:
            hours = plan["time"]["total_seconds"] / 3600
            plan["cost"] = {
                "price_per_gpu_hour": price_per_gpu_hour,
                "gpu_hours": hours * world,
                "total": hours * world * price_per_gpu_hour,
            }
    else:
        notes.append("no token count: time and cost left out (pass --num-tokens or the data)")
    return plan


def memory_by_strategy(
    model: MemoryModel, usable: int, micro: int, checkpointing: bool, gpus: int, nodes: int
) -> dict:
    """Memory lines at the configured micro-batch, whether they fit, and the largest micro-batch
    that fits with and without activation checkpointing, for each strategy."""

    def fits(strategy: str, batch: int, ckpt: bool) -> bool:
        return strategy_memory(model, strategy, batch, ckpt, gpus, nodes, FUSED)["total"] <= usable

    memory = {}
    for strategy in STRATEGIES:
        lines = strategy_memory(model, strategy, micro, checkpointing, gpus, nodes, FUSED)
        memory[strategy] = {
            **lines,
            "fits": lines["total"] <= usable,
            "max_micro_batch": {
                "no_checkpointing": largest_micro_batch(lambda b, s=strategy: fits(s, b, False)),
                "checkpointing": largest_micro_batch(lambda b, s=strategy: fits(s, b, True)),
            },
        }
    return memory


def plan_time(
    plan: dict,
    cfg: RunConfig,
    num_tokens: int,
    num_examples: int | None,
    world: int,
    peak_tflops: float,
) -> dict:
    epochs = float(cfg.train.epochs)
    steps = None
    if num_examples:
        steps = steps_per_epoch(
            num_examples, cfg.train.micro_batch_size, cfg.train.grad_accum, world
        )
        if cfg.train.max_steps is not None:
            epochs = min(epochs, cfg.train.max_steps / steps)
    elif cfg.train.max_steps is not None:
        plan["notes"].append("train.max_steps ignored for time: the example count is unknown")
    compute = plan["compute"]
    timing = training_time(
        num_tokens, 1, compute["flops_per_token"], world, peak_tflops, compute["mfu"]
    )
    return {
        "num_tokens_per_epoch": num_tokens,
        "num_examples_per_epoch": num_examples,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "tokens_per_second": timing["tokens_per_second"],
        "epoch_seconds": timing["epoch_seconds"],
        "total_seconds": timing["epoch_seconds"] * epochs,
    }


def recommend(
    memory: dict,
    communication: dict,
    micro: int,
    accum: int,
    checkpointing: bool,
    gpus: int,
    nodes: int,
) -> dict:
    """ddp when a full replica fits one GPU (only LoRA gradients cross the wire); else hsdp
    across nodes when a node's GPUs hold the model; else fsdp."""
    setting = "checkpointing" if checkpointing else "no_checkpointing"

    def fits(strategy: str) -> int:
        limits = memory[strategy]["max_micro_batch"]
        return limits[setting] or limits["checkpointing"]

    ddp_comm = communication["ddp"]["bytes_per_gpu"] / GB
    fsdp_comm = communication["fsdp"]["bytes_per_gpu"] / GB
    if gpus * nodes == 1 and fits("ddp"):
        strategy, reason = "ddp", "one device: nothing to replicate or shard"
    elif fits("ddp"):
        strategy = "ddp"
        reason = (
            f"a full replica (base {memory['ddp']['weights'] / GIB:.1f} GiB) fits one GPU, so "
            f"only LoRA gradients are all-reduced ({ddp_comm:.3f} GB/GPU per step, vs "
            f"{fsdp_comm:.1f} GB of all-gathers with fsdp)"
        )
    elif nodes > 1 and fits("hsdp"):
        strategy = "hsdp"
        reason = (
            "a replica does not fit one GPU but fits sharded over one node; hsdp keeps the "
            "per-micro-batch all-gathers on intra-node links"
        )
    elif fits("fsdp"):
        strategy = "fsdp"
        reason = "a replica does not fit one GPU; fsdp shards it over every GPU"
    else:
        return {
            "strategy": "fsdp" if gpus * nodes > 1 else "ddp",
            "reason": "nothing fits, even at micro-batch 1 with activation checkpointing: "
            "use more or larger GPUs, or nf4 weights (model.quantization: nf4)",
            "advice": [],
        }
    limits = memory[strategy]["max_micro_batch"]
    advice = []
    use_ckpt = checkpointing
    if not limits[setting]:
        use_ckpt = True
        advice.append("set model.gradient_checkpointing=true: without it nothing fits")
    largest = limits["checkpointing" if use_ckpt else "no_checkpointing"]
    if micro > largest:
        new_accum = math.ceil(micro * accum / largest)
        advice.append(
            f"train.micro_batch_size={micro} does not fit; use train.micro_batch_size={largest} "
            f"train.grad_accum={new_accum} for about the same global batch"
        )
    return {"strategy": strategy, "reason": reason, "advice": advice}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


def format_plan(plan: dict) -> str:
    """The plan as aligned plain text."""
    m, p, hw, b = plan["model"], plan["parameters"], plan["hardware"], plan["batch"]
    out = [
        f"model      {m['name']} ({m['source']}): {m['layers']} layers, hidden {m['hidden']}, "
        f"vocab {m['vocab']}{', tied embeddings' if m['tied_embeddings'] else ''}",
        f"parameters base {p['base']:,}  trainable {p['trainable']:,} "
        f"({p['trainable_percent']:.2f}%)  total {p['total']:,}",
        f"hardware   {hw['nodes']} node(s) x {hw['gpus_per_node']} {hw['name']} "
        f"({_gib(hw['memory_bytes'])} GiB, {_gib(hw['usable_memory_bytes'])} usable), "
        f"{hw['weight_dtype']} weights, {hw['attention']} attention",
        f"batch      micro {b['micro_batch_size']} x seq {b['max_seq_len']} x accum "
        f"{b['grad_accum']} x {hw['world_size']} ranks = {b['tokens_per_step']:,} tokens/step, "
        f"checkpointing {'on' if b['gradient_checkpointing'] else 'off'}",
        "",
    ]
    rows = [
        ("weights", "weights"),
        ("adapter + saved modules", "adapter"),
        ("gradients", "gradients"),
        ("optimizer (AdamW)", "optimizer"),
        ("gathered params", "gathered_params"),
        ("activations", "activations"),
        ("loss (fused op chunk)", "loss"),
        ("recompute (beyond loss)", "recompute"),
        ("allocator (CPU: kept)", "allocator"),
        ("overhead", "overhead"),
        ("total", "total"),
    ]
    width = 26
    out.append(f"{'memory per GPU (GiB)':<{width}}" + "".join(f"{s:>12}" for s in STRATEGIES))
    for label, key in rows:
        out.append(
            f"  {label:<{width - 2}}"
            + "".join(f"{_gib(plan['memory'][s][key]):>12}" for s in STRATEGIES)
        )
    out.append(
        f"  {'fits':<{width - 2}}"
        + "".join(f"{'yes' if plan['memory'][s]['fits'] else 'NO':>12}" for s in STRATEGIES)
    )
    out.append(
        f"  {'max micro-batch (no ckpt)':<{width - 2}}"
        + "".join(
            f"{plan['memory'][s]['max_micro_batch']['no_checkpointing']:>12}" for s in STRATEGIES
        )
    )
    out.append(
        f"  {'max micro-batch (ckpt)':<{width - 2}}"
        + "".join(
            f"{plan['memory'][s]['max_micro_batch']['checkpointing']:>12}" for s in STRATEGIES
        )
    )
    out.append(
        f"  {'comm GB/GPU/step':<{width - 2}}"
        + "".join(f"{plan['communication'][s]['bytes_per_gpu'] / GB:>12.3f}" for s in STRATEGIES)
    )
    alt = plan["alternatives"]
    out += [
        "",
        f"alternatives  activations {_gib(alt['activations_no_checkpointing'])} GiB without / "
        f"{_gib(alt['activations_checkpointing'])} GiB with checkpointing; plain-logits loss "
        f"{_gib(alt['loss_plain'])} GiB; nf4 weights {_gib(alt['weights_nf4'])} GiB",
    ]
    rec = plan["recommendation"]
    out.append(f"recommended   {rec['strategy']}: {rec['reason']}")
    out += [f"              {line}" for line in rec["advice"]]
    c = plan["compute"]
    out.append(f"compute       {c['flops_per_token'] / 1e9:.2f} GFLOP/token at MFU {c['mfu']:.2f}")
    t = plan["time"]
    if t:
        steps = f", {t['steps_per_epoch']} steps/epoch" if t["steps_per_epoch"] else ""
        out.append(
            f"time          {t['num_tokens_per_epoch']:,} tokens/epoch{steps}, "
            f"{t['tokens_per_second']:,.0f} tokens/s: {_duration(t['epoch_seconds'])}/epoch, "
            f"{_duration(t['total_seconds'])} for {t['epochs']:g} epoch(s)"
        )
    if plan["cost"]:
        cost = plan["cost"]
        out.append(
            f"cost          {cost['gpu_hours']:.2f} GPU-hours x ${cost['price_per_gpu_hour']:.2f} "
            f"= ${cost['total']:.2f}"
        )
    out += [f"note          {n}" for n in plan["notes"]]
    return "\n".join(out) + "\n"

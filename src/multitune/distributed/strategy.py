"""How the model is spread over the processes: ``distributed.strategy`` -> device mesh -> FSDP2.

All three strategies are FSDP2 ``fully_shard`` on a device mesh, so one code path serves them
(and the checkpointer sees DTensors in every case):

- ``fsdp``: 1-D mesh over all processes; every parameter sharded across all of them.
- ``hsdp``: 2-D mesh (nodes x processes per node): sharded within a node, replicated across
  nodes, so only gradients cross the slower inter-node links.
- ``ddp``: 2-D mesh (all processes x 1): replicated everywhere, gradients all-reduced.

Under LoRA the base is frozen, so sharding it only saves memory and costs an all-gather of the
base on every micro-batch; the gradients that must be reduced are the small LoRA ones. ``auto``
therefore replicates (ddp, or hsdp over several nodes) whenever the base fits one GPU.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from multitune.config.schema import DistributedConfig, ModelConfig, check_quantization_for_sharding
from multitune.distributed.process_group import DistContext
from multitune.models.lora import decoder_and_head

log = logging.getLogger(__name__)

# The base "fits one GPU" when its weights take at most this share of the GPU's memory; the rest
# is for activations, the chunked loss, LoRA gradients and optimizer state.
FIT_FRACTION = 0.5


def choose_strategy(requested: str, base_bytes: int, ctx: DistContext) -> tuple[str, str]:
    """(strategy, why) for ``distributed.strategy``; ``auto`` follows the rule in the docstring."""
    if requested != "auto":
        return requested, "set by distributed.strategy"
    replicated = "hsdp" if ctx.num_nodes > 1 else "ddp"
    where = f"{ctx.num_nodes} nodes" if ctx.num_nodes > 1 else "one node"
    if ctx.device.type != "cuda":
        return replicated, f"auto: no GPU, the base stays in host memory; {where} -> {replicated}"
    gpu_bytes = torch.cuda.get_device_properties(ctx.device).total_memory
    sizes = f"base weights {base_bytes / 2**30:.1f} GiB, GPU {gpu_bytes / 2**30:.1f} GiB"
    if base_bytes <= FIT_FRACTION * gpu_bytes:
        return replicated, (
            f"auto: the base fits one GPU ({sizes}), so only LoRA gradients need to cross the "
            f"network; {where} -> {replicated}"
        )
    return "fsdp", (
        f"auto: the base does not fit one GPU with room to train ({sizes}; limit "
        f"{FIT_FRACTION:.0%}) -> fsdp, sharded over all {ctx.world_size} processes"
    )


def distribute(
    model: torch.nn.Module, cfg: DistributedConfig, model_cfg: ModelConfig, ctx: DistContext
) -> DeviceMesh:
    """Choose the strategy (``distributed.strategy``) and shard or replicate ``model`` in place.

    A tied embedding/head stays one Parameter: FSDP2 shards a Parameter shared by the two
    modules of the embedding/head group once, so its memory is the planner's (tied weights
    counted once). The checkpointer and the adapter gather keep only trainable tensors, so the
    frozen tie's second name needs no Parameter of its own.
    """
    strategy, why = choose_strategy(cfg.strategy, frozen_bytes(model), ctx)
    log.info("distributed strategy %s (%s)", strategy, why)
    if strategy in ("fsdp", "hsdp"):
        check_quantization_for_sharding(model_cfg)
    mesh = apply_strategy(model, strategy, ctx)
    log.info(
        "device mesh: %s", " x ".join(f"{n} {k}" for n, k in zip(mesh.mesh_dim_names, mesh.shape))
    )
    return mesh


def build_mesh(strategy: str, ctx: DistContext) -> DeviceMesh:
    device_type = ctx.device.type
    if strategy == "fsdp":
        return init_device_mesh(device_type, (ctx.world_size,), mesh_dim_names=("shard",))
    if strategy == "hsdp":
        shape = (ctx.num_nodes, ctx.world_size // ctx.num_nodes)
    elif strategy == "ddp":
        shape = (ctx.world_size, 1)
    else:
        raise ValueError(f"unknown distributed.strategy {strategy!r}")
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU; plain float32 on CPU (gloo)."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_strategy(model: torch.nn.Module, strategy: str, ctx: DistContext) -> DeviceMesh:
    """Shard (or replicate) ``model`` in place: one FSDP group per decoder layer, one for the
    input embeddings and the output head together, and the decoder as root.

    Build the optimizer afterwards: it must hold the DTensor parameters. The training step runs
    the decoder and then the head on the answer positions only; the embedding/head group is kept
    unsharded from the decoder's forward until the end of backward (``reshard_after_forward``
    off), so the head call needs no all-gather of its own and tied embeddings (Llama 3.2) stay
    one tensor. A trained embedding/head (``lora.modules_to_save``) is sharded in that group
    too: its gradient, from the embedding lookup and from the head inside the fused op, reaches
    the unsharded tensor and is reduce-scattered once at the end of backward. Gradients are summed, not averaged, over ranks: each rank's loss is already
    divided by the global answer-token count.
    """
    mesh = build_mesh(strategy, ctx)
    policy = mixed_precision(ctx.device)
    check_packed_weights(model, policy)
    decoder, head = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(decoder).__name__} has no `layers` ModuleList to shard per decoder layer"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(
        [decoder.get_input_embeddings(), head],
        mesh=mesh,
        mp_policy=policy,
        reshard_after_forward=False,
    )
    fully_shard(decoder, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives (gloo has no pre-multiplied sum).
            module.set_force_sum_reduction_for_comms(True)
    return mesh


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP group back in its sharded state (no-op for a model without groups).

    The embedding/head group and the root keep their whole tensors after a forward until the
    next backward (``reshard_after_forward`` off, see ``apply_strategy``); after an evaluation
    (no backward), ``model.parameters()`` would hand an optimizer or a checkpoint those whole
    tensors instead of the sharded ones. FSDP2's ``reshard()`` does nothing for such a group
    after a forward, so each group is switched to resharding for the call and back.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        return
    for module in modules:
        module.set_reshard_after_forward(True, recurse=False)
        module.reshard()
    decoder, head = decoder_and_head(model)
    for module in (decoder, decoder.get_input_embeddings(), head):
        if isinstance(module, FSDPModule):
            module.set_reshard_after_forward(False, recurse=False)


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Reduce gradients over ranks at the end of this backward (``enabled``) or keep them local.

    Accumulation turns it off for every micro-batch but the window's last: FSDP2 then sums the
    unsharded gradients locally and reduces once per optimizer step (one reduce-scatter, and
    under hsdp/ddp one all-reduce, per group) instead of once per micro-batch. The sum is the
    same; only the number of collectives changes. A model without FSDP groups is left alone.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


def check_packed_weights(model: torch.nn.Module, policy: MixedPrecisionPolicy) -> None:
    """Refuse 4-bit weights packed in a float dtype the policy would cast: FSDP2 casts every
    floating-point parameter to ``param_dtype`` after the all-gather, which would scramble the
    packed bits (bitsandbytes Params4bit; bf16 storage under the GPU's bf16 policy is not cast)."""
    packed = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    cast = {d for d in packed if d.is_floating_point and policy.param_dtype not in (None, d)}
    if cast:
        raise ValueError(
            f"model.quant_storage={str(cast.pop()).removeprefix('torch.')} would be cast to "
            f"{str(policy.param_dtype).removeprefix('torch.')} by the sharded model's "
            "mixed-precision policy, which scrambles packed 4-bit weights; set "
            "model.quant_storage: bfloat16 (the default)"
        )


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen (base) weights, each storage (a tied embedding) counted once."""
    storages = {}
    for p in model.parameters():
        if not p.requires_grad:
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(storages.values())


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable tensors (LoRA weights, trained embeddings), gathered onto rank 0's CPU
    under every name they have (peft's save looks a tied trained head up under its own name);
    empty on the other ranks. A collective: call on every rank.

    Only trainable tensors are gathered: DCP's ``get_model_state_dict(ignore_frozen_params=True)``
    keeps a frozen tied head under its second name and would gather the whole embedding.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    main = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        if main:
            state[name] = whole.detach().to("cpu", copy=True)
    return state

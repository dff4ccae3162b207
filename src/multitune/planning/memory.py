"""Memory per device for a LoRA run, line by line, for each parallel strategy.

Every figure is in bytes. Activations follow what autograd actually keeps for a Llama block in
transformers with a frozen base (see ``activation_bytes_per_token``); ``bench/plan_accuracy.py``
measures them against real training steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from multitune.config.schema import LoraConfig
from multitune.planning.architecture import Shape
from multitune.planning.parameters import ParameterCounts

STRATEGIES = ("ddp", "hsdp", "fsdp")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES = 4  # peft keeps LoRA weights in float32 under a bf16/fp16 base
# QLoRA-style 4-bit NormalFloat: 0.5 byte, plus double-quantised constants (an 8-bit absmax per
# 64 weights and an fp32 scale per 256 of those), for the decoder's linear layers only.
NF4_BYTES_PER_PARAM = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8
# Loss memory without a fused kernel, per token x vocab entry: the float32 log-probabilities
# cross_entropy keeps, then at the start of backward their gradient and the logits' gradient.
PLAIN_LOSS_FLOAT32_COPIES = 3
LOSS_CHUNK_TOKENS = 1024  # rows a fused linear + cross-entropy projects at a time


@dataclass(frozen=True)
class MemoryModel:
    """What the memory of one training process depends on, apart from batch and strategy."""

    shape: Shape
    counts: ParameterCounts
    lora: LoraConfig
    weight_bytes: int  # bytes per frozen base parameter (2 bf16, 4 fp32)
    attention: str  # sdpa | flash_attention_2 | eager
    seq_len: int
    overhead_bytes: int
    # Mean tokens of a training example; with packing, a micro-batch fills only as many rows as
    # its examples need. None: every row is full (micro_batch x seq_len positions).
    example_tokens: float | None = None
    packing: bool = True
    # Prefix-sharing rows whose width a cost model chooses: a micro-batch fills about as many
    # positions as its tokens, with no rounding up to whole rows of seq_len.
    free_width: bool = False
    # Share of the positions that are answer tokens (the SFT loss projects only those onto the
    # vocabulary); 1.0 when unknown.
    answer_fraction: float = 1.0
    # Freed blocks the host allocator keeps (CPU only), as fractions of the frozen weights and
    # of the activations (see planning.hardware).
    allocator_retention: tuple[float, float] = (0.0, 0.0)

    def positions(self, micro_batch: int) -> int:
        """Token positions (rows x width) of one micro-batch of ``micro_batch`` examples."""
        full = micro_batch * self.seq_len
        if self.example_tokens is not None and self.free_width:
            return math.ceil(micro_batch * self.example_tokens)
        if self.example_tokens is None or not self.packing:
            return full
        rows = math.ceil(micro_batch * self.example_tokens / self.seq_len)
        return min(full, rows * self.seq_len)

    @property
    def activation_bytes(self) -> int:
        return self.weight_bytes  # activations run in the weights' dtype

    @property
    def trainable_bytes(self) -> int:
        return ADAPTER_BYTES * self.counts.adapter + self.weight_bytes * self.counts.saved_modules


def activation_bytes_per_token(m: MemoryModel) -> dict[str, int]:
    """Bytes autograd keeps per token, per decoder layer and outside the layers.

    With a = bytes of the activation dtype, h hidden, q = heads*head_dim, I intermediate:

    - RMSNorm (x2): its float32 input (4h + 4 for the rsqrt) -- the normalised output is not
      kept, because the linears after it are frozen and need only their weights for backward.
    - attention: q, k, v after RoPE and the output, kept by sdpa/flash: a*(2q + 2kv) + 4*heads
      (log-sum-exp). kv = q when sdpa gets a padding mask (transformers then repeats K/V for
      GQA), kv_heads*head_dim with flash_attention_2. eager also keeps the probabilities,
      heads*seq*(4 + a).
    - SwiGLU: gate output, silu(gate), up output: 3*a*I.
    - LoRA (``models.lora.DroppedInputLinear``): each adapted layer's input once, in the
      activation dtype (q/k/v read the first norm's output, gate/up the second's; o_proj reads
      the attention output, kept by the attention already), a bool dropout mask per adapted
      layer when dropout > 0 (1*in), and A's output for B's gradient (4*r).
    - sdpa with a mask (padding, or the block mask of packed rows): torch turns the boolean
      [batch, 1, seq, seq] mask into one in the activation dtype per call and keeps it for
      backward: a*seq per token and layer.

    Outside the layers: the final norm's float32 input (4h). ``layer_input`` (a*h) is all a
    layer keeps under activation checkpointing.
    """
    s, lora = m.shape, m.lora
    a = m.activation_bytes
    kv = s.kv_dim if m.attention == "flash_attention_2" else s.q_dim
    attention = a * (2 * s.q_dim + 2 * kv) + 4 * s.heads
    if m.attention == "eager":
        attention += s.heads * m.seq_len * (4 + a)
    elif m.attention == "sdpa":
        attention += a * m.seq_len
    layer = 2 * (4 * s.hidden + 4) + attention + 3 * a * s.intermediate
    linears = s.linear_shapes()
    targets = set(lora.target_modules) & set(linears)
    inputs_kept = 0
    if targets & {"q_proj", "k_proj", "v_proj"}:
        inputs_kept += s.hidden
    if targets & {"gate_proj", "up_proj"}:
        inputs_kept += s.hidden
    if "down_proj" in targets:
        inputs_kept += s.intermediate
    mask = 1 if lora.dropout > 0 else 0
    lora_bytes = a * inputs_kept + sum(
        mask * linears[t][0] + ADAPTER_BYTES * lora.r for t in targets
    )
    return {
        "layer": layer,
        "layer_lora": lora_bytes,
        "layer_input": a * s.hidden,
        "outside_layers": 4 * s.hidden,
    }


def activation_memory(m: MemoryModel, micro_batch: int, checkpointing: bool) -> int:
    """Activations alive at the start of backward, for a micro-batch of ``micro_batch`` examples
    (``MemoryModel.positions``).

    Without checkpointing that is every layer's tensors; with it, only each layer's input (the
    layer is recomputed during backward, see ``recompute_memory``).
    """
    per_token = activation_bytes_per_token(m)
    if checkpointing:
        per_layer = per_token["layer_input"]
    else:
        per_layer = per_token["layer"] + per_token["layer_lora"]
    return m.positions(micro_batch) * (m.shape.layers * per_layer + per_token["outside_layers"])


def recompute_memory(m: MemoryModel, micro_batch: int, checkpointing: bool) -> int:
    """Under checkpointing, one layer's full activations, rebuilt during its backward."""
    if not checkpointing:
        return 0
    per_token = activation_bytes_per_token(m)
    return m.positions(micro_batch) * (per_token["layer"] + per_token["layer_lora"])


def loss_memory(m: MemoryModel, micro_batch: int, fused: bool = False) -> int:
    """Logits memory for a micro-batch.

    plain: every position x vocab x 4 bytes x 3 (log-probs, their gradient, the logits'
    gradient), as ``model(labels=...)`` computes; fused: the answer positions only
    (``answer_fraction``), at most ``LOSS_CHUNK_TOKENS`` rows x vocab x 4 bytes at a time.
    """
    tokens = m.positions(micro_batch)
    if fused:
        answers = math.ceil(tokens * m.answer_fraction)
        return min(answers, LOSS_CHUNK_TOKENS) * m.shape.vocab * 4
    return tokens * m.shape.vocab * 4 * PLAIN_LOSS_FLOAT32_COPIES


def shard_count(strategy: str, gpus_per_node: int, nodes: int) -> int:
    """How many ways the parameters, gradients and optimizer state are split."""
    return {"ddp": 1, "hsdp": gpus_per_node, "fsdp": gpus_per_node * nodes}[strategy]


def gathered_parameters(m: MemoryModel) -> int:
    """Unsharded parameters a sharded rank holds at once: the root unit (embeddings, head, final
    norm, saved-module copies; kept gathered for the step) and two decoder layers (the one
    running and the one prefetched)."""
    s, w = m.shape, m.weight_bytes
    root = w * (s.vocab * s.hidden * (1 if s.tied_embeddings else 2) + s.hidden)
    root += w * m.counts.saved_modules
    layer = w * (sum(i * o for i, o in s.linear_shapes().values()) + 2 * s.hidden)
    layer += ADAPTER_BYTES * m.counts.adapter // max(1, s.layers)
    return root + 2 * layer


def strategy_memory(
    m: MemoryModel,
    strategy: str,
    micro_batch: int,
    checkpointing: bool,
    gpus_per_node: int,
    nodes: int,
    fused_loss: bool = False,
) -> dict[str, int]:
    """Bytes per device, line by line, with their ``total``.

    weights: frozen base in its dtype; adapter: LoRA in float32 plus saved-module copies in the
    base dtype; gradients: the same sizes; optimizer: AdamW's two moments in each parameter's
    dtype. fsdp divides these four by the world size, hsdp by the GPUs of a node, ddp by 1.
    """
    shards = shard_count(strategy, gpus_per_node, nodes)
    c, w = m.counts, m.weight_bytes
    loss = loss_memory(m, micro_batch, fused_loss)
    lines = {
        "weights": math.ceil(w * c.base / shards),
        "adapter": math.ceil(m.trainable_bytes / shards),
        "gradients": math.ceil(m.trainable_bytes / shards),
        "optimizer": math.ceil(2 * m.trainable_bytes / shards),
        "gathered_params": gathered_parameters(m) if shards > 1 else 0,
        "activations": activation_memory(m, micro_batch, checkpointing),
        "loss": loss,
        # The recomputed layer and the loss's buffers are never alive together (the loss's
        # backward ends before the first layer is recomputed): count only the excess.
        "recompute": max(0, recompute_memory(m, micro_batch, checkpointing) - loss),
        "allocator": 0,
        "overhead": m.overhead_bytes,
    }
    of_weights, of_activations = m.allocator_retention
    live = lines["activations"] + lines["recompute"]
    lines["allocator"] = math.ceil(of_weights * lines["weights"] + of_activations * live)
    lines["total"] = sum(lines.values())
    return lines


def micro_batch_candidates(limit: int = 8192) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ...: powers of two and the midpoints between them."""
    sizes, power = [1], 2
    while power <= limit:
        sizes += [power, power + power // 2]
        power *= 2
    return sorted({n for n in sizes if n <= limit})


def largest_micro_batch(fits: Callable[[int], bool], limit: int = 8192) -> int:
    """The largest candidate micro-batch for which ``fits`` holds; 0 if even 1 does not fit."""
    best = 0
    for size in micro_batch_candidates(limit):
        if not fits(size):
            break
        best = size
    return best

"""One optimizer step with token-exact gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitune.data.prefix_sharing import attention_segments, prefix_sharing_mask
from multitune.distributed.strategy import set_gradient_sync
from multitune.losses.causal_lm import next_token_targets, token_losses
from multitune.models import attention
from multitune.models.lora import decoder_and_head


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm is NaN/inf; the step is not applied."""


@dataclass
class StepResult:
    loss: torch.Tensor  # token-mean loss over the whole accumulation window (detached)
    grad_norm: torch.Tensor
    num_tokens: int  # answer tokens in the window
    num_input_tokens: int  # non-pad tokens in the window
    task_loss_sums: torch.Tensor  # [num_tasks] summed answer-token losses
    task_token_counts: torch.Tensor  # [num_tasks]


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    task_loss_weights: torch.Tensor,
    num_tasks: int,
    window_tokens: int | None = None,
    decoder: torch.nn.Module | None = None,
) -> StepResult:
    """Forward/backward every micro-batch; gradients end normalised by the window's token count.

    Each micro-batch contributes sum(weighted token losses) / N, with N the answer tokens of the
    whole window, so 1 x batch 8 and 8 x batch 1 produce the same gradient. Micro-batches are
    padded (``collate``) or packed (``data.packing.pack``); the model runs its decoder only
    (``decoder``, e.g. a compiled one, defaults to the model's) and the loss projects just the
    answer positions inside the fused op.
    Under data parallelism ``window_tokens`` is N over all ranks (this rank holds a share of
    the window); by default N counts this rank's micro-batches.
    """
    model_decoder, head = decoder_and_head(model)
    decoder = model_decoder if decoder is None else decoder
    device = task_loss_weights.device
    targets = [micro_batch_targets(mb).to(device) for mb in micro_batches]
    num_tokens = (
        int(sum(int((t != -100).sum()) for t in targets))
        if window_tokens is None
        else window_tokens
    )
    if num_tokens == 0:
        raise ValueError("an accumulation window holds no answer tokens")
    total = torch.zeros((), device=device)
    task_sums = torch.zeros(num_tasks, device=device)
    task_counts = torch.zeros(num_tasks, device=device)
    num_input_tokens = 0
    one_row = uses_flash_attention(model_decoder)
    mask_dtype = sharing_mask_dtype(model_decoder)
    last = len(micro_batches) - 1
    for number, (mb, target) in enumerate(zip(micro_batches, targets)):
        set_gradient_sync(model, number == last)  # one reduction per optimizer step
        inputs = decoder_inputs(mb, device, one_row, mask_dtype, decoder is model_decoder)
        hidden = decoder(**inputs).last_hidden_state
        hidden = hidden.view(*target.shape, -1)  # back to [rows, T, H] after a one-row forward
        num_input_tokens += count_input_tokens(mb)
        losses = token_losses(hidden, head, target)  # [rows, T]
        per_example = example_sums(losses, mb)
        tasks = mb["task_index"].to(device)
        weighted = (per_example * task_loss_weights[tasks]).sum()
        (weighted / num_tokens).backward()
        total += per_example.sum().detach()
        task_sums.index_add_(0, tasks, per_example.detach())
        task_counts.index_add_(0, tasks, example_sums((target != -100).float(), mb))
    return StepResult(
        loss=total / num_tokens,
        grad_norm=torch.zeros(()),
        num_tokens=num_tokens,
        num_input_tokens=num_input_tokens,
        task_loss_sums=task_sums,
        task_token_counts=task_counts,
    )


def uses_flash_attention(decoder: torch.nn.Module) -> bool:
    return str(getattr(decoder.config, "_attn_implementation", "")).startswith("flash")


def sharing_mask_dtype(decoder: torch.nn.Module) -> torch.dtype | None:
    """The dtype of a prefix-sharing mask for ``decoder``: None (boolean) for sdpa, the model's
    float dtype (additive) for eager attention, which adds the mask to its scores."""
    if str(getattr(decoder.config, "_attn_implementation", "")) == "sdpa":
        return None
    return decoder.dtype


def micro_batch_targets(mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets of a padded, packed or prefix-sharing micro-batch."""
    if "node_index" in mb:
        # Suffix positions continue from their prefix: example borders are where the token's
        # example changes (a prefix's last position predicts nothing either).
        return next_token_targets(mb["labels"], sequence_index=mb["sequence_index"])
    return next_token_targets(mb["labels"], mb.get("position_ids"))


def decoder_inputs(
    mb: dict[str, torch.Tensor],
    device,
    one_row: bool = False,
    mask_dtype: torch.dtype | None = None,
    segmented: bool = True,
) -> dict:
    """Keyword arguments of the decoder for a padded, a packed or a prefix-sharing micro-batch.

    Under sdpa (``mask_dtype`` None) a prefix-sharing micro-batch also passes its
    ``attention_segments`` (``models.attention``) unless ``segmented`` is False: a compiled
    decoder keeps the one masked call, as the segments' loop would recompile for every layout.

    ``one_row`` lays a packed micro-batch's rows end to end and passes the example borders as
    ``cu_seq_lens_*``: flash-attention runs its varlen kernel on them (transformers only
    splits a packed batch of one row), while sdpa/eager build a [T x T] block mask per row and
    are cheaper on the short rows. (Running sdpa per example on CPU instead was measured on the
    demo and gained nothing over the block mask.)
    """
    # No KV cache: training never reuses it, and transformers only reads position restarts as
    # example borders when there is none.
    if "node_index" in mb:
        # An explicit 4D mask: transformers passes it to the attention as it is.
        assert not one_row, "flash-attention takes no prefix-sharing mask"
        mask = prefix_sharing_mask(mb, device, mask_dtype)
        inputs = {
            "input_ids": mb["input_ids"].to(device),
            "position_ids": mb["position_ids"].to(device),
            "attention_mask": mask,
            "use_cache": False,
        }
        segments = attention_segments(mb, mask) if segmented and mask_dtype is None else None
        if segments is not None:
            attention.install()
            inputs["attention_segments"] = segments
        return inputs
    if "position_ids" in mb:
        # Packed: no attention mask, so transformers isolates the examples by position restarts.
        ids, positions = mb["input_ids"], mb["position_ids"]
        inputs = {"use_cache": False}
        if one_row:
            ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
            starts = (positions[0] == 0).nonzero().flatten()
            bounds = torch.cat([starts, torch.tensor([positions.shape[1]])]).to(device, torch.int32)
            longest = int(bounds.diff().max())
            inputs.update(
                cu_seq_lens_q=bounds,
                cu_seq_lens_k=bounds,
                max_length_q=longest,
                max_length_k=longest,
            )
        return {"input_ids": ids.to(device), "position_ids": positions.to(device), **inputs}
    return {
        "input_ids": mb["input_ids"].to(device),
        "attention_mask": mb["attention_mask"].to(device),
        "use_cache": False,
    }


def count_input_tokens(mb: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a padded or packed micro-batch (a shared prefix counts once)."""
    if "node_index" in mb:
        return int((mb["node_index"] >= 0).sum())
    if "sequence_index" in mb:
        return int((mb["sequence_index"] >= 0).sum())
    return int(mb["attention_mask"].sum())


def example_sums(values: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum per-position ``values`` [rows, T] (0 on padding) into one value per example."""
    if "sequence_index" not in mb:
        return values.sum(dim=1)  # padded: one example per row
    index = mb["sequence_index"].to(values.device)
    sums = values.new_zeros(len(mb["task_index"]))
    return sums.index_add(0, index.clamp(min=0).flatten(), values.flatten())


def clip_and_check(model: torch.nn.Module, max_norm: float | None, step: int) -> torch.Tensor:
    """Clip gradients and refuse to step on a NaN/inf loss or gradient."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2) give a DTensor norm
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        raise NonFiniteError(
            f"step {step}: gradient norm is {norm.item()}; lower train.lr or check the data"
        )
    return norm

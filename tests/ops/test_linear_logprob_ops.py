"""linear_cross_entropy and linear_token_logprobs against their unfused references."""

from __future__ import annotations

import pytest
import torch

from multitune.ops import (
    linear_cross_entropy,
    linear_token_logprobs,
    reference_linear_cross_entropy,
    reference_linear_token_logprobs,
)

pytestmark = pytest.mark.usefixtures("cpp_backend")

IGNORE = -100
OPS = {
    "cross_entropy": (linear_cross_entropy, reference_linear_cross_entropy),
    "token_logprobs": (linear_token_logprobs, reference_linear_token_logprobs),
}
op_and_reference = pytest.mark.parametrize("op, reference", OPS.values(), ids=OPS.keys())


def make_inputs(
    num_tokens: int = 11,
    hidden_size: int = 6,
    vocab_size: int = 13,
    ignored: tuple[int, ...] = (1, 4, 5),
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, dtype=dtype)
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    targets[list(ignored)] = IGNORE
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def values_and_grads(fn, hidden, weight, targets, **kwargs):
    out = fn(hidden, weight, targets, **kwargs)
    # Non-uniform upstream gradient, so a wrong per-token scaling cannot cancel out.
    upstream = torch.linspace(0.5, 2.0, out.shape[0], dtype=out.dtype)
    params = [t for t in (hidden, weight) if t.requires_grad]
    grads = torch.autograd.grad((out * upstream).sum(), params)
    return out.detach(), grads


@op_and_reference
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_values_and_grads_match_reference_for_any_chunk_size(op, reference, chunk_size):
    # 8 labelled tokens: chunk 3 leaves a ragged last chunk, 64 takes all in one.
    hidden, weight, targets = make_inputs()
    out, grads = values_and_grads(op, hidden, weight, targets, chunk_size=chunk_size)
    ref_out, ref_grads = values_and_grads(reference, hidden, weight, targets)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_cross_entropy_matches_hand_computed_value():
    # logits = [0, ln 3] for the single token; target 1 -> loss = -ln(3/4) = ln(4/3).
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [torch.log(torch.tensor(3.0)).item()]], dtype=torch.float64)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1]))
    torch.testing.assert_close(loss, torch.tensor([0.2876820724517809], dtype=torch.float64))


def test_token_logprobs_are_negated_cross_entropy():
    hidden, weight, targets = make_inputs(seed=3)
    logprobs = linear_token_logprobs(hidden, weight, targets, chunk_size=4)
    losses = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    torch.testing.assert_close(logprobs, -losses, rtol=0, atol=0)


@op_and_reference
def test_ignored_positions_get_zero_value_and_zero_hidden_grad(op, reference):
    hidden, weight, targets = make_inputs(ignored=(0, 2, 10))
    out, (grad_hidden, _) = values_and_grads(op, hidden, weight, targets, chunk_size=3)
    assert out[[0, 2, 10]].tolist() == [0.0, 0.0, 0.0]
    assert (out[[1, 3, 9]] != 0).all()
    assert grad_hidden[[0, 2, 10]].abs().sum().item() == 0.0
    assert (grad_hidden[[1, 3, 9]].abs().sum(dim=1) > 0).all()


@op_and_reference
def test_all_ignored_batch_gives_zeros_not_nan(op, reference):
    hidden, weight, targets = make_inputs(ignored=tuple(range(11)))
    out, (grad_hidden, grad_weight) = values_and_grads(op, hidden, weight, targets, chunk_size=4)
    assert out.tolist() == [0.0] * 11
    assert grad_hidden.abs().sum().item() == 0.0
    assert grad_weight.abs().sum().item() == 0.0
    assert grad_weight.shape == weight.shape


@op_and_reference
def test_frozen_weight_gets_no_grad_and_hidden_grad_matches_reference(op, reference):
    hidden, weight, targets = make_inputs()
    frozen = weight.detach()  # a LoRA-frozen lm_head
    op(hidden, frozen, targets, chunk_size=3).sum().backward()
    expected = torch.autograd.grad(reference(hidden, frozen, targets).sum(), hidden)[0]
    assert frozen.grad is None
    torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=1e-12)


@op_and_reference
def test_frozen_hidden_gets_no_grad_but_weight_does(op, reference):
    hidden, weight, targets = make_inputs()
    frozen_hidden = hidden.detach()
    op(frozen_hidden, weight, targets, chunk_size=3).sum().backward()
    expected = torch.autograd.grad(reference(frozen_hidden, weight, targets).sum(), weight)[0]
    assert frozen_hidden.grad is None
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op_name", ["linear_cross_entropy", "linear_token_logprobs"])
def test_backward_op_skips_gradients_that_are_not_required(op_name):
    hidden, weight, targets = make_inputs()
    backward = getattr(torch.ops.multitune, f"{op_name}_backward")
    grad = torch.ones(hidden.shape[0], dtype=torch.float64)
    grad_hidden, grad_weight = backward(grad, hidden, weight, targets, IGNORE, 4, -1, True, False)
    assert grad_hidden.shape == hidden.shape
    assert grad_weight.shape == (0,)  # the [V, H] product was never computed
    grad_hidden, grad_weight = backward(grad, hidden, weight, targets, IGNORE, 4, -1, False, True)
    assert grad_hidden.shape == (0,)
    assert grad_weight.shape == weight.shape


@op_and_reference
def test_gradcheck_in_float64(op, reference):
    hidden, weight, targets = make_inputs(num_tokens=7, hidden_size=3, vocab_size=5, ignored=(2,))
    assert torch.autograd.gradcheck(
        lambda h, w: op(h, w, targets, chunk_size=4), (hidden, weight), eps=1e-6, atol=1e-8
    )


@op_and_reference
def test_non_contiguous_hidden_matches_reference(op, reference):
    # Hidden states sliced out of a [T, B, H] activation, as after a shift-by-one.
    generator = torch.Generator().manual_seed(5)
    activation = torch.randn(6, 3, 4, generator=generator, dtype=torch.float64)
    hidden = activation.transpose(0, 1)[:, :-1].reshape(-1, 4)[::2]
    weight = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 9, (hidden.shape[0],), generator=generator)
    torch.testing.assert_close(
        op(hidden, weight, targets, chunk_size=2),
        reference(hidden, weight, targets),
        rtol=0,
        atol=1e-12,
    )


@op_and_reference
def test_bf16_inputs_are_computed_in_float32(op, reference):
    hidden, weight, targets = make_inputs(
        num_tokens=32, hidden_size=16, vocab_size=50, dtype=torch.bfloat16
    )
    out, (grad_hidden, grad_weight) = values_and_grads(op, hidden, weight, targets, chunk_size=5)
    ref_out, (ref_grad_hidden, ref_grad_weight) = values_and_grads(
        reference, hidden, weight, targets
    )
    assert out.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-2, atol=1e-2)


@op_and_reference
def test_custom_ignore_index_is_respected(op, reference):
    hidden, weight, targets = make_inputs(ignored=())
    targets[3] = 0  # with ignore_index=0, token 3 (and any other 0) is skipped
    out = op(hidden, weight, targets, ignore_index=0, chunk_size=2)
    torch.testing.assert_close(
        out, reference(hidden, weight, targets, ignore_index=0), rtol=0, atol=1e-12
    )
    assert out[3].item() == 0.0


def test_out_of_range_target_raises_a_readable_error():
    hidden, weight, targets = make_inputs(vocab_size=13)
    targets[0] = 13
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 13\).*\[\d+, 13\]"):
        linear_cross_entropy(hidden, weight, targets)


def test_mismatched_hidden_size_raises():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 6"):
        linear_token_logprobs(hidden, weight[:, :5], targets)


@pytest.mark.parametrize("op_name", ["linear_cross_entropy", "linear_token_logprobs"])
@pytest.mark.parametrize("weight_requires_grad", [True, False])
@pytest.mark.parametrize("num_labelled", [-1, 7])  # counted on the device, or given
def test_opcheck_passes(op_name, weight_requires_grad, num_labelled):
    hidden, weight, targets = make_inputs(num_tokens=9, ignored=(0, 7))
    weight.requires_grad_(weight_requires_grad)
    op = getattr(torch.ops.multitune, op_name).default
    torch.library.opcheck(op, (hidden, weight, targets, IGNORE, 4, num_labelled))


@op_and_reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_given_label_count_gives_the_same_values_and_grads(op, reference, dtype):
    hidden, weight, targets = make_inputs(num_tokens=9, ignored=(0, 7))
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    counted = values_and_grads(op, hidden, weight, targets, chunk_size=4)
    given = values_and_grads(op, hidden, weight, targets, chunk_size=4, num_labelled=7)
    torch.testing.assert_close(given, counted, rtol=0, atol=0)
    if dtype == torch.float32:  # bf16 against the reference: test_bf16_inputs_...
        expected = values_and_grads(reference, hidden, weight, targets)
        torch.testing.assert_close(given, expected, rtol=1e-4, atol=1e-4)


def test_a_wrong_label_count_is_an_error():
    hidden, weight, targets = make_inputs(num_tokens=9, ignored=(0, 7))
    with pytest.raises(RuntimeError, match="num_labelled must count the targets"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=4, num_labelled=6)


@pytest.mark.parametrize("all_labelled", [False, True])
def test_a_given_label_count_never_syncs_with_the_device(all_labelled):
    # .item() and nonzero (a size read from the device) are the op's only host syncs; with the
    # count given, neither runs in forward or backward. Without it, both do: the probe works.
    from torch.profiler import ProfilerActivity, profile

    hidden, weight, targets = make_inputs(num_tokens=9, ignored=() if all_labelled else (0, 7))
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    count = 9 if all_labelled else 7
    syncing = {"aten::nonzero", "aten::_local_scalar_dense", "aten::item"}

    def under_assert(event) -> bool:
        # _assert_async reads its flag on the host only on CPU; on a GPU it checks on the device.
        while event is not None:
            if event.name == "aten::_assert_async":
                return True
            event = event.cpu_parent
        return False

    def calls(num_labelled):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            linear_cross_entropy(hidden, weight, targets, IGNORE, 4, num_labelled).sum().backward()
        return sorted(e.name for e in prof.events() if e.name in syncing and not under_assert(e))

    assert calls(count) == []
    assert "aten::nonzero" in calls(None)


def test_torch_compile_full_graph_matches_eager():
    hidden, weight, targets = make_inputs(
        num_tokens=40,
        hidden_size=8,
        vocab_size=30,
        ignored=tuple(range(0, 40, 3)),
        dtype=torch.float32,
    )

    def mean_loss(h, w, y):
        return linear_cross_entropy(h, w, y, chunk_size=6).sum() / (y != IGNORE).sum()

    # aot_eager traces through Dynamo and AOTAutograd (the fake and autograd kernels) without
    # paying for Inductor's C++ codegen, which alone takes ~30 s on 2 cores.
    compiled = torch.compile(mean_loss, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected = mean_loss(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)

"""The fused ops against their pure-PyTorch references on one device, values and gradients.

``linear_cross_entropy`` and ``linear_token_logprobs`` (C++ extension when active) against
``reference_*`` (full [N, V] logits in float32), for bf16 inputs by default, with ignored
positions and a trainable weight, on a Llama-3.2-like head (hidden 2048, vocabulary 128256) by
default. Prints one line per op and check; exits 1 if any is out of tolerance. bench/gpu.sh
runs it on CUDA; ``--device cpu --vocab 4096 --hidden 128`` is its dry run.
"""

from __future__ import annotations

import argparse
import sys

import torch

from multitune import ops
from multitune.ops.extension import CPP
from multitune.ops.linear_cross_entropy import reference_linear_cross_entropy
from multitune.ops.linear_token_logprobs import reference_linear_token_logprobs

# bf16 inputs, float32 compute on both sides: only summation order differs.
TOLERANCE = {"value": 2e-3, "grad": 2e-2}


def check(name, fused, reference, args) -> bool:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    labels[::3] = -100  # prompt positions
    results = []
    for fn in (fused, reference):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = fn(h, w, labels, -100)
        # A weighting, so the gradient differs per row (as token-normalised losses do).
        (out * torch.linspace(0.5, 1.5, len(out), device=device)).sum().backward()
        results.append((out.float(), h.grad.float(), w.grad.float()))
    ok = True
    for what, a, b, kind in zip(
        ("value", "grad hidden", "grad weight"), results[0], results[1], ("value", "grad", "grad")
    ):
        error = ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
        passed = error <= TOLERANCE[kind]
        ok &= passed
        print(
            f"{name:<22} {what:<12} max error / max |ref| {error:.2e}  {'ok' if passed else 'FAIL'}"
        )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    backend = ops.active_backend()
    print(f"backend {backend}, device {args.device}, dtype {args.dtype}")
    if backend != CPP:  # the fallback IS the reference: nothing would be checked
        print(f"the C++ extension is not active: {ops.extension_error()}")
        sys.exit(1)
    ok = check(
        "linear_cross_entropy", ops.linear_cross_entropy, reference_linear_cross_entropy, args
    )
    ok &= check(
        "linear_token_logprobs", ops.linear_token_logprobs, reference_linear_token_logprobs, args
    )
    print("fused ops match their references" if ok else "fused ops DIFFER from their references")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Bytes each GPU sends per optimizer step, per strategy (ring collectives).

A ring all-gather or reduce-scatter of S bytes over n ranks moves (n-1)/n * S per rank; an
all-reduce moves twice that. With G GPUs per node, N nodes, W = G*N, P the bytes of all
parameters in their training dtypes, T the bytes of the trainable gradients, k = grad_accum:

- ddp:  all-reduce of T once per step (gradient sync skipped while accumulating):
        2(W-1)/W * T.
- fsdp: per micro-batch, all-gather of every parameter for forward and again for backward,
        and a reduce-scatter of T: k * (2(W-1)/W * P + (W-1)/W * T).
- hsdp: the fsdp traffic inside a node (G ranks), then an all-reduce of each rank's 1/G
        gradient shard across the N nodes: k * (2(G-1)/G * P + (G-1)/G * T) intra-node
        + 2(N-1)/N * T/G inter-node.
"""

from __future__ import annotations


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def communication_per_step(
    strategy: str,
    param_bytes: int,
    grad_bytes: int,
    gpus_per_node: int,
    nodes: int,
    grad_accum: int,
) -> dict[str, int | str]:
    """Bytes sent per GPU per optimizer step, split into intra-node and inter-node traffic."""
    world = gpus_per_node * nodes
    if strategy == "ddp":
        volume = 2 * _ring(world) * grad_bytes
        intra, inter = (volume, 0.0) if nodes == 1 else (0.0, volume)
        what = "all-reduce of trainable gradients, once per step"
    elif strategy == "fsdp":
        per_micro = 2 * _ring(world) * param_bytes + _ring(world) * grad_bytes
        volume = grad_accum * per_micro
        intra, inter = (volume, 0.0) if nodes == 1 else (0.0, volume)
        what = (
            "all-gather of all parameters (forward + backward) and reduce-scatter of "
            "gradients, per micro-batch"
        )
    elif strategy == "hsdp":
        g = gpus_per_node
        intra = grad_accum * (2 * _ring(g) * param_bytes + _ring(g) * grad_bytes)
        inter = 2 * _ring(nodes) * grad_bytes / g
        what = (
            "fsdp inside each node per micro-batch, then all-reduce of gradient shards "
            "across nodes once per step"
        )
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return {
        "bytes_per_gpu": round(intra + inter),
        "intra_node_bytes": round(intra),
        "inter_node_bytes": round(inter),
        "what": what,
    }

"""`multitune launch`: build the torchrun command for this node, from flags or the cluster's env.

Each value is taken from the first place that sets it: explicit flags, then SLURM, then runpod
Instant Clusters, then the generic ``MASTER_ADDR`` / ``MASTER_PORT``, then single-node defaults.
Run the command once per node (``srun`` does that on SLURM; on runpod, run it on every node).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MASTER_PORT = 29500
DEFAULT_RDZV_ID = "multitune"

# (where, environment variable) pairs in resolution order. Runpod also sets WORLD_SIZE, but to the
# total number of GPUs in the cluster (NUM_NODES * NUM_TRAINERS), not a per-node or per-process
# value, and torchrun sets the real WORLD_SIZE for each worker itself: never read it here.
NNODES_VARS = (("SLURM", "SLURM_NNODES"), ("runpod", "NUM_NODES"))
NODE_RANK_VARS = (("SLURM", "SLURM_NODEID"), ("runpod", "NODE_RANK"))
NPROC_VARS = (
    ("SLURM", "SLURM_GPUS_ON_NODE"),
    ("SLURM", "SLURM_GPUS_PER_NODE"),
    ("runpod", "NUM_TRAINERS"),
)
MASTER_ADDR_VARS = (
    ("SLURM", "SLURM_JOB_NODELIST"),
    ("runpod", "PRIMARY_ADDR"),
    ("env", "MASTER_ADDR"),
)
MASTER_PORT_VARS = (("runpod", "PRIMARY_PORT"), ("env", "MASTER_PORT"))
RDZV_ID_VARS = (("SLURM", "SLURM_JOB_ID"),)
SOURCE_ORDER = ("flags", "SLURM", "runpod", "env", "defaults")


@dataclass(frozen=True)
class LaunchPlan:
    """The resolved torchrun settings for this node, and where each came from."""

    nnodes: int
    nproc_per_node: int
    node_rank: int | None  # None: unknown; torchrun then guesses which node hosts the rendezvous
    master_addr: str | None  # None only on a single node (standalone rendezvous)
    master_port: int
    rdzv_id: str
    source: str  # e.g. "SLURM (SLURM_NNODES=3, ...); defaults (master-port=29500)"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu-[01-03,07],cpu5`` without calling scontrol."""
    hosts = [host for part in _split_outside_brackets(nodelist) for host in _expand_host(part)]
    if not hosts:
        raise ValueError(f"SLURM nodelist {nodelist!r} names no hosts")
    return hosts


def _split_outside_brackets(nodelist: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(nodelist[start:index])
            start = index + 1
        if depth not in (0, 1):
            raise ValueError(f"SLURM nodelist {nodelist!r} has unbalanced or nested brackets")
    if depth != 0:
        raise ValueError(f"SLURM nodelist {nodelist!r} has an unclosed '['")
    parts.append(nodelist[start:])
    if any(not part.strip() for part in parts):
        raise ValueError(f"SLURM nodelist {nodelist!r} has an empty host name")
    return [part.strip() for part in parts]


def _expand_host(pattern: str) -> list[str]:
    """``rack[1-2]-gpu[01-02]`` -> every combination, zero padding kept as written."""
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)
    prefix, body, rest = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    numbers = []
    for item in body.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
            raise ValueError(f"SLURM nodelist range {item!r} in {pattern!r} is not N or N-M")
        stop = int(high) if dash else int(low)
        numbers += [str(n).zfill(len(low)) for n in range(int(low), stop + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_host(rest)]


def _parse_int(var: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not an integer") from None


def _parse_gpu_count(var: str, raw: str) -> int:
    # SLURM_GPUS_PER_NODE keeps the GPU type when one was requested: "a100:4".
    try:
        return int(raw.rsplit(":", 1)[-1])
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a GPU count (N or TYPE:N)") from None


def _parse_master_addr(var: str, raw: str) -> str:
    return expand_nodelist(raw)[0] if var == "SLURM_JOB_NODELIST" else raw


def _local_gpu_count() -> int:
    import torch  # only for the single-node default

    return torch.cuda.device_count()


def resolve_launch(
    env: Mapping[str, str],
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_id: str | None = None,
) -> LaunchPlan:
    """Resolve this node's launch settings: arguments > SLURM > runpod > MASTER_* > defaults."""
    origins: list[tuple[str, str]] = []  # (where, "NAME=value"), only for values the argv uses

    def pick(explicit, flag: str, candidates, parse: Callable[[str, str], object]):
        if explicit is not None:
            return explicit, ("flags", f"{flag}={explicit}")
        for where, var in candidates:
            raw = env.get(var, "").strip()
            if raw:
                value = parse(var, raw)
                shown = f"{var}={raw}" if str(value) == raw else f"{var}={raw} -> {value}"
                return value, (where, shown)
        return None, None

    num_nodes, nnodes_origin = pick(nnodes, "--nnodes", NNODES_VARS, _parse_int)
    if num_nodes is None:
        num_nodes, nnodes_origin = 1, ("defaults", "nnodes=1")
    origins.append(nnodes_origin)
    if num_nodes < 1:
        raise ValueError(f"the number of nodes must be at least 1, got {nnodes_origin[1]}")

    nproc, nproc_origin = pick(nproc_per_node, "--nproc-per-node", NPROC_VARS, _parse_gpu_count)
    if nproc is None:
        num_gpus = _local_gpu_count()
        nproc = num_gpus or 1
        seen = "visible CUDA devices" if num_gpus else "no CUDA device"
        nproc_origin = ("defaults", f"nproc-per-node={nproc} [{seen}]")
    origins.append(nproc_origin)
    if nproc < 1:
        raise ValueError(f"the processes per node must be at least 1, got {nproc_origin[1]}")

    rank, rank_origin = pick(node_rank, "--node-rank", NODE_RANK_VARS, _parse_int)
    if rank is not None and not 0 <= rank < num_nodes:
        raise ValueError(
            f"{rank_origin[1]} is not a node rank in [0, {num_nodes}) ({nnodes_origin[1]})"
        )

    addr, port, run_id = None, DEFAULT_MASTER_PORT, DEFAULT_RDZV_ID
    if num_nodes > 1:  # a single node uses torchrun's standalone rendezvous on a free port
        if rank_origin is not None:
            origins.append(rank_origin)
        addr, addr_origin = pick(master_addr, "--master-addr", MASTER_ADDR_VARS, _parse_master_addr)
        if addr is None:
            raise ValueError(
                f"{num_nodes} nodes need the rendezvous address of node 0: pass --master-addr, or "
                "set MASTER_ADDR (runpod sets PRIMARY_ADDR, SLURM sets SLURM_JOB_NODELIST)"
            )
        origins.append(addr_origin)
        port, port_origin = pick(master_port, "--master-port", MASTER_PORT_VARS, _parse_int)
        if port is None:
            port = DEFAULT_MASTER_PORT
            port_origin = ("defaults", f"master-port={port}")
        origins.append(port_origin)
        if not 0 < port < 65536:
            raise ValueError(f"the master port must be in 1-65535, got {port_origin[1]}")
        picked_id, id_origin = pick(rdzv_id, "--rdzv-id", RDZV_ID_VARS, lambda var, raw: raw)
        if picked_id is not None:
            run_id = picked_id
            origins.append(id_origin)

    groups = {where: [text for w, text in origins if w == where] for where in SOURCE_ORDER}
    source = "; ".join(f"{where} ({', '.join(texts)})" for where, texts in groups.items() if texts)
    return LaunchPlan(num_nodes, nproc, rank if num_nodes > 1 else 0, addr, port, run_id, source)


def torchrun_argv(
    plan: LaunchPlan, config: str, overrides: Sequence[str], max_restarts: int = 0
) -> list[str]:
    """The torchrun command line that runs ``multitune train CONFIG OVERRIDES`` under ``plan``."""
    if max_restarts < 0:
        raise ValueError(f"--max-restarts must be 0 or more, got {max_restarts}")
    argv = ["torchrun", "--nnodes", str(plan.nnodes), "--nproc-per-node", str(plan.nproc_per_node)]
    if plan.nnodes == 1:
        argv.append("--standalone")
    else:
        host = f"[{plan.master_addr}]" if ":" in str(plan.master_addr) else plan.master_addr
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{plan.master_port}"]
        argv += ["--rdzv-id", plan.rdzv_id]
        # torchrun ignores --node-rank with c10d (ranks are assigned at rendezvous), but it still
        # has to decide which node hosts the rendezvous store. It guesses by matching the address
        # against this machine's, which fails when that address is on a secondary NIC (runpod's
        # ens1), so say it outright whenever the node rank is known.
        if plan.node_rank is not None:
            argv += ["--rdzv-conf", f"is_host={int(plan.node_rank == 0)}"]
    argv += ["--max-restarts", str(max_restarts), "-m", "multitune", "train", config, *overrides]
    return argv


def build_torchrun_argv(
    config: str,
    overrides: list[str],
    env: Mapping[str, str],
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    max_restarts: int = 0,
    rdzv_id: str | None = None,
) -> list[str]:
    """Resolve this node's settings from the arguments and ``env``; return the torchrun argv."""
    plan = resolve_launch(env, nnodes, nproc_per_node, node_rank, master_addr, master_port, rdzv_id)
    return torchrun_argv(plan, config, overrides, max_restarts)


def describe_launch(argv: Sequence[str], source: str) -> str:
    """One line: the shape of the launch and where its values came from."""
    head = list(argv[: list(argv).index("-m")])
    flags = dict(zip(head, head[1:]))
    nnodes, nproc = int(flags["--nnodes"]), int(flags["--nproc-per-node"])
    shape = f"launch: {nnodes} node(s) x {nproc} process(es) = {nnodes * nproc} ranks"
    if "--standalone" in head:
        where = "standalone rendezvous on this node"
    else:
        host_flag = {"is_host=1": ", hosted here", "is_host=0": ", hosted on node 0"}
        where = (
            f"rendezvous {flags['--rdzv-endpoint']}{host_flag.get(flags.get('--rdzv-conf'), '')}"
        )
    return f"{shape}, {where}; from {source}"


def _torchrun_executable() -> str:
    # `.venv/bin/multitune` works without activating the venv; prefer the torchrun beside this
    # interpreter so the workers run the same Python, not whichever torchrun is first on PATH.
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else "torchrun"


def run_launch(argv: Sequence[str], dry_run: bool) -> int:
    """Print the command (``dry_run``) or replace this process with it."""
    if dry_run:
        print(shlex.join(argv))
        return 0
    executable = _torchrun_executable() if argv[0] == "torchrun" else argv[0]
    # By default torchrun keeps one TCP store across restarts of the worker group, and the
    # restarted workers can read the previous attempt's peer addresses from it (seen here as
    # gloo "Connection refused" after `--max-restarts`); a fresh store per attempt avoids that.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(executable, list(argv))
    except FileNotFoundError:
        raise RuntimeError(f"{argv[0]} not found: is torch installed in {sys.prefix}?") from None


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``multitune launch CONFIG [overrides] [flags]``."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 seed=3"
    )
    nodes = parser.add_argument_group("overrides for what the environment says")
    nodes.add_argument("--nnodes", type=int, help="number of nodes (default: from the env, or 1)")
    nodes.add_argument(
        "--nproc-per-node", type=int, help="processes (GPUs) per node (default: GPUs visible)"
    )
    nodes.add_argument("--node-rank", type=int, help="this node's index, 0 hosts the rendezvous")
    nodes.add_argument("--master-addr", help="address of node 0 (multi-node only)")
    nodes.add_argument("--master-port", type=int, help=f"default {DEFAULT_MASTER_PORT}")
    nodes.add_argument("--rdzv-id", help="rendezvous id (default: SLURM_JOB_ID or multitune)")
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="torchrun restarts of all workers on a failure"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the torchrun command instead of running it"
    )


def cmd_launch(args: argparse.Namespace) -> int:
    """Validate the config here, once, then start torchrun for this node."""
    from multitune.config.loader import load_config

    load_config(args.config, args.overrides)  # fail before the rendezvous, not on every rank
    plan = resolve_launch(
        os.environ,
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_id=args.rdzv_id,
    )
    argv = torchrun_argv(plan, args.config, args.overrides, args.max_restarts)
    print(describe_launch(argv, plan.source), file=sys.stderr, flush=True)
    return run_launch(argv, args.dry_run)

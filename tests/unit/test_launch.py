"""`multitune launch`: the torchrun argv built from flags, SLURM, runpod and plain environments."""

import argparse
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from multitune.distributed import launch
from multitune.distributed.launch import (
    add_launch_arguments,
    build_torchrun_argv,
    cmd_launch,
    describe_launch,
    expand_nodelist,
    resolve_launch,
    run_launch,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/llama-3.2-1b-multitask-lora.yaml"
TRAIN = ["-m", "multitune", "train", CONFIG, "train.epochs=1"]
RUNPOD_ENV = {
    "PRIMARY_ADDR": "10.65.0.2",
    "MASTER_ADDR": "10.65.0.2",
    "PRIMARY_PORT": "29400",
    "MASTER_PORT": "29400",
    "NODE_RANK": "1",
    "NUM_NODES": "3",
    "NUM_TRAINERS": "4",
    "WORLD_SIZE": "12",
}
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "3",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu-[07-09]",
    "SLURM_GPUS_ON_NODE": "4",
}


@pytest.fixture(autouse=True)
def no_local_gpus(monkeypatch):
    """The single-node default must not depend on the machine running the tests."""
    monkeypatch.setattr(launch, "_local_gpu_count", lambda: 0)


def argv_for(env, **flags):
    return build_torchrun_argv(CONFIG, ["train.epochs=1"], env, **flags)


def test_runpod_node_1_of_3_joins_the_primary_with_4_workers():
    assert argv_for(RUNPOD_ENV) == [
        "torchrun", "--nnodes", "3", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.65.0.2:29400",
        "--rdzv-id", "multitune", "--rdzv-conf", "is_host=0",
        "--max-restarts", "0", *TRAIN,
    ]  # fmt: skip


def test_runpod_world_size_is_never_read_as_a_per_node_or_per_process_count():
    # Runpod's WORLD_SIZE=12 is the cluster's GPU total; reading it as nproc or nnodes would start
    # 12 workers per node or wait for 12 nodes.
    without = {k: v for k, v in RUNPOD_ENV.items() if k != "WORLD_SIZE"}
    assert argv_for(RUNPOD_ENV) == argv_for(without)
    assert argv_for({"WORLD_SIZE": "12"}) == argv_for({})


def test_runpod_primary_node_hosts_the_rendezvous_and_defaults_to_port_29500():
    env = {"PRIMARY_ADDR": "10.65.0.2", "NODE_RANK": "0", "NUM_NODES": "3", "NUM_TRAINERS": "4"}
    assert argv_for(env) == [
        "torchrun", "--nnodes", "3", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.65.0.2:29500",
        "--rdzv-id", "multitune", "--rdzv-conf", "is_host=1",
        "--max-restarts", "0", *TRAIN,
    ]  # fmt: skip


def test_slurm_node_2_uses_the_first_host_of_the_nodelist_and_the_job_id():
    env = {**SLURM_ENV, "MASTER_PORT": "24242"}
    assert argv_for(env, max_restarts=2) == [
        "torchrun", "--nnodes", "3", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-07:24242",
        "--rdzv-id", "4242", "--rdzv-conf", "is_host=0",
        "--max-restarts", "2", *TRAIN,
    ]  # fmt: skip


def test_slurm_wins_over_runpod_and_reads_a_typed_gpus_per_node():
    env = {**RUNPOD_ENV, **SLURM_ENV, "SLURM_GPUS_PER_NODE": "a100:2"}
    del env["SLURM_GPUS_ON_NODE"]
    plan = resolve_launch(env)
    assert (plan.nnodes, plan.nproc_per_node, plan.node_rank) == (3, 2, 2)
    assert (plan.master_addr, plan.master_port, plan.rdzv_id) == ("gpu-07", 29400, "4242")
    assert plan.source == (
        "SLURM (SLURM_NNODES=3, SLURM_GPUS_PER_NODE=a100:2 -> 2, SLURM_NODEID=2, "
        "SLURM_JOB_NODELIST=gpu-[07-09] -> gpu-07, SLURM_JOB_ID=4242); runpod (PRIMARY_PORT=29400)"
    )


def test_explicit_flags_override_every_environment_value():
    flags = dict(
        nnodes=2,
        nproc_per_node=8,
        node_rank=0,
        master_addr="head",
        master_port=1234,
        rdzv_id="run7",
    )
    expected = [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:1234",
        "--rdzv-id", "run7", "--rdzv-conf", "is_host=1",
        "--max-restarts", "0", *TRAIN,
    ]  # fmt: skip
    assert argv_for(RUNPOD_ENV, **flags) == expected
    assert argv_for(SLURM_ENV, **flags) == expected
    assert resolve_launch(SLURM_ENV, **flags).source == (
        "flags (--nnodes=2, --nproc-per-node=8, --node-rank=0, --master-addr=head, "
        "--master-port=1234, --rdzv-id=run7)"
    )


def test_single_node_defaults_to_a_standalone_rendezvous(monkeypatch):
    assert argv_for({}) == [
        "torchrun", "--nnodes", "1", "--nproc-per-node", "1", "--standalone",
        "--max-restarts", "0", *TRAIN,
    ]  # fmt: skip
    monkeypatch.setattr(launch, "_local_gpu_count", lambda: 4)
    # A lone MASTER_ADDR does not make a multi-node launch.
    argv = argv_for({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1"})
    assert argv[:6] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "4", "--standalone"]
    assert resolve_launch({}).source == (
        "defaults (nnodes=1, nproc-per-node=4 [visible CUDA devices])"
    )


def test_multi_node_without_a_rank_leaves_the_store_host_to_torchrun():
    argv = argv_for({"MASTER_ADDR": "fd00::1"}, nnodes=2, nproc_per_node=4)
    assert argv == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "[fd00::1]:29500",
        "--rdzv-id", "multitune", "--max-restarts", "0", *TRAIN,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu-[07-09]", ["gpu-07", "gpu-08", "gpu-09"]),
        ("gpu-[01-03,07],cpu5", ["gpu-01", "gpu-02", "gpu-03", "gpu-07", "cpu5"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-g[1,3]", ["r1-g1", "r1-g3", "r2-g1", "r2-g3"]),
        ("x[3],y", ["x3", "y"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [
        ("gpu-[01-03", "unclosed"),
        ("gpu-01-03]", "unbalanced"),
        ("gpu-[[1]]", "nested"),
        ("gpu-[03-01]", "is not N or N-M"),
        ("gpu-[a-b]", "is not N or N-M"),
        ("a,,b", "empty host"),
        ("", "empty host"),
    ],
)
def test_expand_nodelist_rejects_malformed_lists(nodelist, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(nodelist)


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"NUM_NODES": "three"}, {}, r"NUM_NODES='three' is not an integer"),
        ({**SLURM_ENV, "SLURM_NODEID": "x"}, {}, r"SLURM_NODEID='x' is not an integer"),
        ({"SLURM_GPUS_ON_NODE": "4(x2)"}, {}, r"SLURM_GPUS_ON_NODE='4\(x2\)' is not a GPU count"),
        (
            {**RUNPOD_ENV, "PRIMARY_PORT": "29k"},
            {},
            r"PRIMARY_PORT='29k' is not an integer",
        ),
        (
            {**RUNPOD_ENV, "NODE_RANK": "3"},
            {},
            r"NODE_RANK=3 is not a node rank in \[0, 3\) \(NUM_NODES=3\)",
        ),
        ({"NODE_RANK": "1"}, {}, r"NODE_RANK=1 is not a node rank in \[0, 1\) \(nnodes=1\)"),
        (
            SLURM_ENV,
            {"node_rank": -1},
            r"--node-rank=-1 is not a node rank in \[0, 3\) \(SLURM_NNODES=3\)",
        ),
        ({"NUM_NODES": "3", "NODE_RANK": "1"}, {}, "3 nodes need the rendezvous address"),
        ({}, {"nnodes": 0}, "number of nodes must be at least 1, got --nnodes=0"),
        ({"NUM_TRAINERS": "0"}, {}, "at least 1, got NUM_TRAINERS=0"),
        (RUNPOD_ENV, {"master_port": 70000}, "must be in 1-65535, got --master-port=70000"),
        (RUNPOD_ENV, {"max_restarts": -1}, "--max-restarts must be 0 or more"),
    ],
)
def test_bad_settings_raise_errors_that_name_the_source(env, flags, message):
    with pytest.raises(ValueError, match=message):
        argv_for(env, **flags)


def test_describe_launch_says_shape_rendezvous_and_source():
    plan = resolve_launch(SLURM_ENV)
    argv = argv_for(SLURM_ENV)
    assert describe_launch(argv, plan.source) == (
        "launch: 3 node(s) x 4 process(es) = 12 ranks, rendezvous gpu-07:29500, hosted on node 0; "
        "from SLURM (SLURM_NNODES=3, SLURM_GPUS_ON_NODE=4, SLURM_NODEID=2, "
        "SLURM_JOB_NODELIST=gpu-[07-09] -> gpu-07, SLURM_JOB_ID=4242); "
        "defaults (master-port=29500)"
    )
    assert describe_launch(argv_for({}), "defaults (nnodes=1)") == (
        "launch: 1 node(s) x 1 process(es) = 1 ranks, standalone rendezvous on this node; "
        "from defaults (nnodes=1)"
    )


def test_torchrun_parses_the_argv_as_intended():
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv_for(RUNPOD_ENV)[1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("3", "4", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_conf, args.max_restarts) == (
        "10.65.0.2:29400",
        "is_host=0",
        0,
    )
    assert args.module and args.training_script == "multitune"
    assert args.training_script_args == ["train", CONFIG, "train.epochs=1"]
    assert get_args_parser().parse_args(argv_for({})[1:]).standalone


def parse_launch_args(argv):
    parser = argparse.ArgumentParser(prog="multitune launch")
    add_launch_arguments(parser)
    return parser.parse_args(argv)


def test_cmd_launch_dry_run_prints_the_command_for_this_node(monkeypatch, capsys):
    for name in {*RUNPOD_ENV, *SLURM_ENV, "SLURM_GPUS_PER_NODE"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in RUNPOD_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    args = parse_launch_args(["configs/demo.yaml", "seed=3", "--master-port", "29600", "--dry-run"])

    assert cmd_launch(args) == 0

    out, err = capsys.readouterr()
    assert out == (
        "torchrun --nnodes 3 --nproc-per-node 4 --rdzv-backend c10d "
        "--rdzv-endpoint 10.65.0.2:29600 --rdzv-id multitune --rdzv-conf is_host=0 "
        "--max-restarts 0 -m multitune train configs/demo.yaml seed=3\n"
    )
    assert err == (
        "launch: 3 node(s) x 4 process(es) = 12 ranks, rendezvous 10.65.0.2:29600, hosted on "
        "node 0; from flags (--master-port=29600); runpod (NUM_NODES=3, NUM_TRAINERS=4, "
        "NODE_RANK=1, PRIMARY_ADDR=10.65.0.2)\n"
    )


def test_cmd_launch_rejects_a_bad_config_before_starting_torchrun(monkeypatch, tmp_path):
    from multitune.config.loader import ConfigError

    monkeypatch.setattr(launch.os, "execvp", lambda *a: pytest.fail("torchrun was started"))
    with pytest.raises(ConfigError, match="config file not found"):
        cmd_launch(parse_launch_args([str(tmp_path / "missing.yaml")]))


def test_run_launch_quotes_arguments_in_a_dry_run(capsys):
    assert (
        run_launch(["torchrun", "-m", "multitune", "train", "my config.yaml", "a=b c"], True) == 0
    )
    assert capsys.readouterr().out == "torchrun -m multitune train 'my config.yaml' 'a=b c'\n"


def test_run_launch_execs_the_torchrun_beside_this_python(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.os, "execvp", lambda file, argv: calls.append((file, argv)))
    run_launch(["torchrun", "--standalone"], dry_run=False)
    assert calls == [
        (str(Path(launch.sys.executable).with_name("torchrun")), ["torchrun", "--standalone"])
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "script", ["scripts/runpod/train.sh", "scripts/runpod/setup.sh", "scripts/slurm/train.sbatch"]
)
def test_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", ROOT / script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_on_localhost_meet_and_workers_see_torchruns_world_size(tmp_path):
    # Two torchrun agents play nodes 0 and 1 of a runpod cluster; node 1 starts first and waits.
    # Each worker records its rank: runpod's WORLD_SIZE=12 must not leak into the workers.
    (tmp_path / "record_rank.py").write_text(
        "import os, pathlib\n"
        "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')\n"
        "pathlib.Path(os.environ['OUT'], os.environ['RANK']).write_text("
        "' '.join(os.environ[k] for k in keys))\n"
    )
    (tmp_path / "ranks").mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agents = []
    for node_rank in (1, 0):
        cluster = {**RUNPOD_ENV, "PRIMARY_ADDR": "127.0.0.1", "PRIMARY_PORT": str(port)}
        cluster.update(NUM_NODES="2", NUM_TRAINERS="1", NODE_RANK=str(node_rank), WORLD_SIZE="12")
        argv = build_torchrun_argv(CONFIG, [], cluster)
        argv = argv[: argv.index("-m")] + ["-m", "record_rank"]
        env = {**os.environ, **cluster, "OUT": str(tmp_path / "ranks"), "PYTHONPATH": str(tmp_path)}
        log = tmp_path / f"node{node_rank}.log"  # a file: a full pipe would stall the agent
        with log.open("w") as stderr:
            torchrun = launch._torchrun_executable()
            agents.append(
                (subprocess.Popen(argv, executable=torchrun, env=env, stderr=stderr), log)
            )
    try:
        for agent, log in agents:
            assert agent.wait(timeout=120) == 0, log.read_text()
    finally:
        for agent, _ in agents:
            agent.kill()
    assert sorted(p.read_text() for p in (tmp_path / "ranks").iterdir()) == [
        "0 2 1",
        "1 2 1",
    ]

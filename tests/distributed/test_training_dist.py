"""Multi-process training through the real CLI under torchrun (gloo on CPU), against one
uninterrupted 1-process run of the same config (the module's ``reference``).

Run shape: 3 tasks of 10 rows, 25 training examples, global batch 12 of micro-batches of 1, 2
epochs, so 6 optimizer steps, the third and sixth holding a single example (ranks with nothing
of it run a zero-gradient filler). Per process the accumulation is 12 / world: 12 in one
process, 6 in two, 3 in four, 2 in six. LoRA dropout is 0, so 1 and N processes draw the same
numbers; what differs is only the summation order (measured: losses within 2e-7 relative,
adapter tensors within 4e-6 absolute, fsdp over 6 the farthest), hence the stated tolerances.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import REPO, free_port, small_config_dict

from multitune.checkpoint import read_manifest
from multitune.config import validate_config

pytestmark = pytest.mark.distributed

STEPS_PER_EPOCH = 3
STEPS = 2 * STEPS_PER_EPOCH
EXAMPLES = 25  # per epoch
LOSS_RTOL = 1e-5
ADAPTER_ATOL = 1e-5


def run_config(output_dir: Path, **train) -> dict:
    data = small_config_dict(output_dir, max_examples=10)
    data["train"].update(
        {
            "epochs": 2,
            "micro_batch_size": 1,
            "global_batch_size": 12,
            "log_every_steps": 1,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            **train,
        }
    )
    data["eval"].update({"before_training": False, "max_examples": 4})
    return data


def worker_env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # What `multitune launch` sets: a fresh rendezvous store for each restart attempt.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """A process writing into ``log`` (a pipe that nobody reads would stall it), in its own
    session so the test can signal the agent together with its workers."""
    with log.open("a") as out:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env=worker_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def torchrun_argv(
    config: Path, nproc: int, *args: str, nnodes: int = 1, port: int, debug: bool = False
) -> list:
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc),
        *rendezvous,
        "--rdzv-id",
        "test",
        "--local-addr",
        "127.0.0.1",
        *args,
        "-m",
        "multitune",
        *(["--debug"] if debug else []),  # the per-rank example trace is a DEBUG record
        "train",
        str(config),
    ]


def write_config(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def wait(procs: list[subprocess.Popen], log: Path, timeout: float = 400) -> str:
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            kill_tree(proc)
    output = log.read_text()
    assert codes == [0] * len(procs), _tail(output)
    return output


def _tail(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if " DEBUG " not in line)[-4000:]


def train_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train"}


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def trained_examples(output: str) -> list[tuple[int, tuple[int, int]]]:
    """(step, (task, example)) of every example some rank trained on, from the DEBUG trace."""
    seen = []
    for step, pairs in re.findall(r"step (\d+) rank \d+ examples (\[.*\])", output):
        seen += [
            (int(step), tuple(pair))
            for pair in json.loads(pairs.replace("(", "[").replace(")", "]"))
        ]
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, float], dict[str, torch.Tensor], dict]:
    """One process, no torchrun: per-step losses, the final adapter, the final evaluation."""
    from multitune.recipes import sft

    out = tmp_path_factory.mktemp("reference") / "run"
    sft.run(validate_config(run_config(out)))
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, adapter(out), eval_results(out)


def eval_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())


def assert_matches_reference(output_dir: Path, reference, steps=range(1, STEPS + 1)) -> None:
    ref_losses, ref_adapter, ref_eval = reference
    losses = train_losses(output_dir)
    for step in steps:
        assert losses[step] == pytest.approx(ref_losses[step], rel=LOSS_RTOL), step
    trained = adapter(output_dir)
    assert trained.keys() == ref_adapter.keys()
    worst = max((trained[k] - ref_adapter[k]).abs().max().item() for k in trained)
    assert worst <= ADAPTER_ATOL, worst
    # A real difference from the untrained adapter: the comparison is not trivially true.
    assert max(t.abs().max().item() for n, t in trained.items() if "lora_B" in n) > 1e-3
    # The final evaluation, run by every rank in lockstep, scores like one process.
    for task, expected in ref_eval["tasks"].items():
        scored = eval_results(output_dir)["tasks"][task]
        assert scored["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL), task
        assert scored["accuracy"] == expected["accuracy"], task


@pytest.mark.parametrize("strategy", ["hsdp", "fsdp"])
def test_three_agents_on_localhost_match_one_process(tmp_path, reference, strategy):
    # Three torchrun agents meet through a c10d rendezvous, as three nodes of a cluster would,
    # with 2 processes each: hsdp shards within an agent and replicates across (a 3 x 2 mesh);
    # fsdp shards over all 6.
    out = tmp_path / "run"
    data = run_config(out)
    data["eval"]["before_training"] = strategy == "fsdp"  # the base model, sharded, once
    config = write_config(data, tmp_path / "config.yaml")
    log, port = tmp_path / "agents.log", free_port()
    argv = torchrun_argv(config, 2, nnodes=3, port=port) + [f"distributed.strategy={strategy}"]
    output = wait([start(argv, log) for _ in range(3)], log)
    assert f"distributed strategy {strategy} (set by distributed.strategy)" in output
    assert "6 processes (3 nodes x 2)" in output
    mesh = "replicate 3 x shard 2" if strategy == "hsdp" else "shard 6"
    assert f"device mesh: {mesh}" in output
    assert "global batch 12 (micro 1 x accum 2 x 6 processes)" in output
    assert_matches_reference(out, reference)
    # Rank 0 alone writes outputs: one train record per step, not one per rank.
    assert list(train_losses(out)) == list(range(1, STEPS + 1))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == STEPS + 1  # + validation
    if strategy == "fsdp":
        base = eval_results(out)["base"]["tasks"]
        assert set(base) == set(reference[2]["tasks"])
        after = eval_results(out)["tasks"]
        # Scored with the adapter disabled: the base model's own, finite losses.
        assert all(0 < base[t]["loss"] != pytest.approx(after[t]["loss"]) for t in base)


def test_sigterm_saves_and_the_run_resumes_on_fewer_processes(tmp_path, reference):
    # 4 processes (fsdp, asynchronous saves every step): SIGTERM to the torchrun agent, as a
    # preempted pod's PID 1 gets it, is forwarded to the workers, which finish the step, save and
    # exit 0. The same command on 2 processes (ddp) resumes from that checkpoint (DCP reshards
    # the 4-way shards into replicas) and gets SIGTERM in one worker only: every rank stops at the same step
    # and torchrun exits 0. A third launch completes the run. Over the three launches every
    # example of each epoch is trained exactly once, and the run ends as the reference did.
    out = tmp_path / "run"
    data = run_config(out)
    data["checkpoint"] = {"every_steps": 1, "keep_last": 2, "async_save": True}
    config = write_config(data, tmp_path / "config.yaml")
    log = tmp_path / "run.log"

    first = torchrun_argv(config, 4, port=free_port(), debug=True) + ["distributed.strategy=fsdp"]
    first = start(first, log)
    # torchrun forwards the signal to the workers and, once they are down, exits 1 itself (its
    # own SignalException); the workers exit 0 within its 30 s grace, not killed.
    stopped = stop_after_a_step(
        first, out, log, functools.partial(os.kill, first.pid, signal.SIGTERM), code=1
    )
    output = log.read_text()
    assert "global batch 12 (micro 1 x accum 3 x 4 processes)" in output
    assert "Sending process" in output and "closing signal SIGTERM" in output
    assert "forcefully exiting" not in output
    # --debug: every rank logs, and all four stopped at this step.
    assert output.count(f"SIGTERM received: stopped at step {stopped}") == 4
    assert read_manifest(checkpoint(out, stopped)).world_size == 4

    second = torchrun_argv(config, 2, port=free_port(), debug=True) + ["distributed.strategy=ddp"]
    second = start(second, log)
    stopped_again = stop_after_a_step(
        second,
        out,
        log,
        lambda: os.kill(worker_of_rank(second, 1), signal.SIGTERM),
        after=stopped + 1,
        code=0,
    )
    output = log.read_text()
    assert f"resumed from step {stopped} " in output
    assert "saved by 4 ranks, resuming with 2" in output
    assert f"SIGTERM received: stopped at step {stopped_again}" in output

    third = torchrun_argv(config, 2, port=free_port(), debug=True) + ["distributed.strategy=ddp"]
    output = wait([start(third, log)], log)
    assert f"resumed from step {stopped_again} " in output
    seen = trained_examples(output)  # the whole log: all three launches
    assert sorted({step for step, _ in seen}) == list(range(1, STEPS + 1))
    for epoch in range(2):
        examples = [pair for step, pair in seen if (step - 1) // STEPS_PER_EPOCH == epoch]
        assert len(examples) == EXAMPLES, epoch
        assert len(set(examples)) == EXAMPLES, epoch  # none twice, and with 25 none skipped
    assert_matches_reference(out, reference)


def stop_after_a_step(
    agent, out: Path, log: Path, send, after: int = 1, code: int | None = None
) -> int:
    """Once step ``after`` is logged, ``send`` the signal; wait for the agent to exit (with
    ``code`` when given) and return the step the run stopped and checkpointed at, which must
    leave steps to resume."""
    deadline = time.monotonic() + 300
    while max(train_losses_or_none(out), default=0) < after:
        if agent.poll() is not None or time.monotonic() > deadline:
            kill_tree(agent)
            pytest.fail(f"run ended before step {after}:\n{_tail(log.read_text())}")
        time.sleep(0.005)
    send()
    try:
        returned = agent.wait(timeout=300)
    finally:
        kill_tree(agent)
    if code is not None:
        assert returned == code, _tail(log.read_text())
    states = [
        json.loads((path / "train_state.json").read_text())
        for path in (out / "checkpoints").glob("step-*")
        if ".tmp-" not in path.name
    ]
    stopped = max(state["step"] for state in states)
    assert after < stopped < STEPS, _tail(log.read_text())
    assert not (out / "eval_results.json").exists()
    return stopped


def train_losses_or_none(output_dir: Path) -> dict[int, float]:
    """train_losses of a run that may not have written a complete record yet."""
    try:
        return train_losses(output_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:08d}"


def worker_of_rank(agent, rank: int) -> int:
    return next(pid for pid in child_pids(agent.pid) if worker_rank(pid) == rank)


def test_killed_worker_is_restarted_and_the_half_written_checkpoint_ignored(tmp_path, reference):
    # A checkpoint every step. While one is being written (shards and .metadata on disk, not yet
    # committed) both workers are frozen, one is killed, and torchrun (--max-restarts 1) starts
    # the group again: it must resume from the last committed step and finish the same run.
    out = tmp_path / "run"
    data = run_config(out)
    data["checkpoint"] = {"every_steps": 1, "keep_last": 10}
    config = write_config(data, tmp_path / "config.yaml")
    log = tmp_path / "run.log"
    argv = torchrun_argv(config, 2, "--max-restarts", "1", port=free_port())
    agent = start(argv + ["distributed.strategy=fsdp"], log)
    try:
        partial, committed = freeze_and_kill_during_save(agent, out / "checkpoints", log)
    except BaseException:
        kill_tree(agent)
        raise
    output = wait([agent], log)
    last = max(committed)
    assert f"resumed from step {last} " in output
    assert not partial.exists()  # purged by the next commit
    assert_matches_reference(out, reference, steps=range(last + 1, STEPS + 1))


def freeze_and_kill_during_save(agent, root: Path, log: Path) -> tuple[Path, list[int]]:
    """Wait for a ``step-*.tmp-*`` folder whose shards are written; then SIGSTOP the workers,
    and if it is still uncommitted, SIGKILL one and let the other run into the broken group.
    Returns the partial folder and the steps committed at that moment."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            pytest.fail(f"run ended before a save could be interrupted:\n{_tail(log.read_text())}")
        partials = [p for p in root.glob("step-*.tmp-*") if (p / "dcp" / ".metadata").is_file()]
        if not partials or partials[0].name.startswith("step-00000001."):  # keep one to resume
            time.sleep(0.002)
            continue
        workers = child_pids(agent.pid)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        partial = partials[0]
        committed = [int(p.name[5:]) for p in root.glob("step-*") if ".tmp-" not in p.name]
        if partial.is_dir() and committed and len(workers) == 2:
            # Rank 0 commits; killed, it cannot commit after all.
            rank0 = next(pid for pid in workers if worker_rank(pid) == 0)
            os.kill(rank0, signal.SIGKILL)
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            return partial, committed
        for pid in workers:  # committed meanwhile: let it go on to the next save
            os.kill(pid, signal.SIGCONT)
    pytest.fail("no save was caught before its commit")


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a torchrun agent that is still running, and its workers (in sessions of their own)."""
    if proc.poll() is None:
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def worker_rank(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK="))[5:])


def tied_config(out: Path) -> dict:
    """configs/demo.yaml's trained embed_tokens (lora.modules_to_save), which the tiny model ties
    to the output head: one trainable tensor under two names. The base is evaluated first (with
    the adapter disabled), and best/ is saved mid-run (step 3) and at the last step."""
    data = run_config(out)
    data["lora"]["modules_to_save"] = ["embed_tokens"]
    data["checkpoint"] = {"every_steps": STEPS_PER_EPOCH}
    data["eval"].update({"every_steps": STEPS_PER_EPOCH, "before_training": True})
    return data


@pytest.fixture(scope="module")
def tied_reference(tmp_path_factory):
    from multitune.recipes import sft

    one = tmp_path_factory.mktemp("tied") / "one"
    sft.run(validate_config(tied_config(one)))
    reference = train_losses(one), adapter(one), eval_results(one)
    assert any("embed_tokens" in name for name in reference[1])
    return reference, best_adapter(one)


def best_adapter(output_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    step = json.loads((output_dir / "best" / "best.json").read_text())["step"]
    return step, load_file(output_dir / "best" / "adapter_model.safetensors")


@pytest.mark.parametrize(("strategy", "agents"), [("fsdp", 1), ("ddp", 1), ("hsdp", 2)])
def test_trained_tied_embedding_trains_saves_best_and_resumes(
    tmp_path, tied_reference, strategy, agents
):
    # The tied trained embedding is sharded in the embedding/head group. 2 processes (fsdp,
    # ddp) or 2 agents x 2 (hsdp: replicate 2 x shard 2) match one process, losses, adapter and
    # best/ (saved at step 3 and again at step 6; the base evaluation before training used to
    # leave the trained copy frozen on the shards: KeyError 'modules_to_save.default.weight'
    # saving best/, and an embedding the optimizer did not step). The fsdp checkpoint of the
    # end of epoch 0, resumed by one process, ends with the same adapter.
    from multitune.recipes import sft

    reference, (best_step, best) = tied_reference
    two = tmp_path / "two"
    path = write_config(tied_config(two), tmp_path / "two.yaml")
    log, port = tmp_path / "run.log", free_port()
    argv = torchrun_argv(path, 2, nnodes=agents, port=port) + [f"distributed.strategy={strategy}"]
    output = wait([start(argv, log) for _ in range(agents)], log)
    if strategy == "hsdp":
        assert "device mesh: replicate 2 x shard 2" in output
    assert_matches_reference(two, reference)
    assert "new best loss = " in output and f"at step {STEPS_PER_EPOCH}: saved" in output
    saved_step, saved = best_adapter(two)
    assert saved_step == best_step == STEPS
    assert saved.keys() == best.keys()
    assert max((saved[k] - best[k]).abs().max().item() for k in saved) <= ADAPTER_ATOL
    if strategy != "fsdp":
        return

    resumed = tmp_path / "resumed"
    epoch_end = f"step-{STEPS_PER_EPOCH:08d}"
    assert read_manifest(two / "checkpoints" / epoch_end).world_size == 2
    shutil.copytree(two / "checkpoints" / epoch_end, resumed / "checkpoints" / epoch_end)
    sft.run(validate_config(tied_config(resumed)))
    assert list(train_losses(resumed)) == list(range(STEPS_PER_EPOCH + 1, STEPS + 1))
    assert_matches_reference(resumed, reference, steps=range(STEPS_PER_EPOCH + 1, STEPS + 1))

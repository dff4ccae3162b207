"""Save and load a run's stateful objects: trainable parameters, optimizer, scheduler, train
state and per-rank RNG, through torch.distributed.checkpoint (DCP).

DCP writes each rank's own shards, so the same code serves one CPU process (no process group:
DCP's ``no_dist`` mode), DDP and FSDP2. ``root`` must be a filesystem every rank sees.

A save is started (``start_checkpoint``) and then committed (``PendingCheckpoint.commit``):
synchronously both at once (``save_checkpoint``), or with ``write_async`` the tensors are written
by ``dcp.async_save`` in a background thread while training goes on, and the commit (verify,
manifest, rename) waits for that write, so a failed write fails the commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from multitune.checkpoint.commit import commit_checkpoint, purge_checkpoints, temporary_name
from multitune.checkpoint.layout import (
    DCP_DIR,
    SCHEDULER_FILE,
    TRAIN_STATE_FILE,
    rng_file_name,
    step_folder_name,
)
from multitune.checkpoint.manifest import (
    CheckpointError,
    read_manifest,
    verify_checkpoint,
    write_file_durably,
)
from multitune.checkpoint.ranks import (
    broadcast_from_rank0,
    gather_problems,
    is_distributed,
    rank_and_world_size,
)
from multitune.checkpoint.rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

# Only what training changes: LoRA adapters, not the frozen base weights.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)
# strict=True would demand the frozen keys we deliberately left out; check_trainable_tensors
# checks the trainable key set instead.
_TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_state: dict,
    keep_last: int = 2,
    config_hash: str | None = None,
) -> Path:
    """Write ``root/step-{step:08d}`` atomically and return it; call on every rank.

    Every rank writes into one ``.tmp-*`` folder; once all have finished, the trainable tensors
    are read back and compared with the model (whole shape, same values); then rank 0 writes the
    manifest and commits with a single rename, and only then purges committed checkpoints beyond
    the newest ``keep_last`` and stale ``.tmp-*`` folders. Raises CheckpointError, on every rank,
    when any stage fails; nothing is committed then.
    """
    return start_checkpoint(
        root, step, model, optimizer, scheduler, train_state, keep_last, config_hash
    ).commit()


@dataclass
class PendingCheckpoint:
    """A checkpoint whose files are (being) written into ``tmp``; ``commit`` makes it count."""

    step: int
    root: Path
    tmp: Path
    final: Path
    model: torch.nn.Module
    keep_last: int
    config_hash: str | None
    written: Future | None = None  # the asynchronous tensor write; None once written
    expected: dict | None = None  # the trainable tensors when the save started (async only)

    def commit(self) -> Path:
        """Wait for the write, verify, and commit as ``save_checkpoint`` describes; call on every
        rank, at the same point of the run."""
        problems = []
        if self.written is not None:
            try:
                self.written.result()
            except (Exception, CheckpointException) as error:  # any failure must fail the run
                problems.append(
                    f"the asynchronous write into {self.tmp / DCP_DIR} failed: {_cause(error)}"
                )
            self.written = None
        _raise_if_any(gather_problems(problems), f"checkpoint for step {self.step} not written")
        _raise_if_any(
            gather_problems(check_trainable_tensors(self.tmp, self.model, expected=self.expected)),
            f"checkpoint {self.tmp} does not hold the whole trainable tensors the model holds, so "
            "it is not committed (a sharded model saved only one rank's slice?)",
        )
        rank, world_size = rank_and_world_size()
        outcome = None
        if rank == 0:
            try:
                commit_checkpoint(self.tmp, self.final, self.step, world_size, self.config_hash)
            except OSError as error:
                outcome = f"committing {self.tmp} as {self.final} failed: {error}"
            else:
                try:
                    purge_checkpoints(self.root, self.keep_last, self.final)
                except OSError as error:
                    log.warning("purging old checkpoints under %s failed: %s", self.root, error)
        outcome = broadcast_from_rank0(outcome)  # also holds other ranks until the commit is done
        if outcome:
            raise CheckpointError(outcome)
        if rank == 0:
            log.info("saved checkpoint %s", self.final)
        return self.final


def start_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_state: dict,
    keep_last: int = 2,
    config_hash: str | None = None,
    *,
    write_async: bool = False,
) -> PendingCheckpoint:
    """Write this step's state into a ``.tmp-*`` folder and return it uncommitted; call on every
    rank. With ``write_async`` the tensors are copied now and written in a background thread
    (``dcp.async_save``): commit before the next save, and before the process ends."""
    if keep_last < 1:
        raise ValueError(
            f"keep_last must be at least 1, got {keep_last}: the checkpoint just written is "
            "always kept (a run that purged it could not resume)"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if train_state.get("step", step) != step:
        raise ValueError(f"train_state['step'] is {train_state['step']} but step is {step}")
    train_state_json = _encode_train_state(train_state)
    rng_state = capture_rng_state()
    rank, _ = rank_and_world_size()
    root = Path(root)
    final = root / step_folder_name(step)
    tmp = root / broadcast_from_rank0(temporary_name(final.name) if rank == 0 else None)
    tmp.mkdir(parents=True, exist_ok=True)
    pending = PendingCheckpoint(step, root, tmp, final, model, keep_last, config_hash)

    model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE)
    state = {"model": _trainable_only(model, model_state), "optim": optim_state}
    if write_async:
        # The next optimizer step changes these tensors in place while the thread writes: write,
        # and verify against, copies taken now. (DCP's own staging keeps CPU tensors as they are,
        # and only reads them, so the commit can compare the read-back with the same copies.)
        state = _copied(state)
        pending.expected = state["model"]
        pending.written = _dcp_async_save(state, tmp / DCP_DIR)
    else:
        _dcp_save(state, tmp / DCP_DIR)
    problems = []
    try:
        write_file_durably(tmp / rng_file_name(rank), _torch_bytes(rng_state))
        if rank == 0:
            write_file_durably(tmp / SCHEDULER_FILE, _torch_bytes(scheduler.state_dict()))
            write_file_durably(tmp / TRAIN_STATE_FILE, train_state_json.encode("utf-8"))
    except OSError as error:
        problems.append(f"writing into {tmp} failed: {error}")
    _raise_if_any(gather_problems(problems), f"checkpoint for step {step} not written")
    return pending


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    verify: bool = True,
) -> dict:
    """Restore a committed checkpoint in place and return its train state; call on every rank.

    Trainable parameters and optimizer state are resharded by DCP to the current layout. This
    rank's RNG is restored when the checkpoint has a file for it; after a change of world size
    ranks without one keep their RNG, with a warning. ``verify=False`` skips the sha256 check,
    for a path that ``find_resume_checkpoint`` has just verified.
    """
    path = Path(path)
    rank, world_size = rank_and_world_size()
    if verify:
        problems = broadcast_from_rank0(verify_checkpoint(path) if rank == 0 else None)
        _raise_if_any(problems, f"checkpoint {path} failed verification")
    manifest = read_manifest(path)
    _raise_if_any(
        check_trainable_tensors(path, model, compare_values=False),
        f"checkpoint {path} does not fit this model (other LoRA rank or target modules?)",
    )

    # DCP's state-dict helper creates missing optimizer state (exp_avg, ...) with a zero-lr step
    # so that there is something to load into, but skips that while gradients exist.
    optimizer.zero_grad(set_to_none=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE)
    model_state = _trainable_only(model, model_state)
    _dcp_load({"model": model_state, "optim": optim_state}, path / DCP_DIR)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=_TRAINABLE_LOAD,
    )
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    train_state = json.loads((path / TRAIN_STATE_FILE).read_text(encoding="utf-8"))

    rng_file = path / rng_file_name(rank)
    if manifest.world_size != world_size:
        log.warning(
            "checkpoint %s was saved by %d ranks, resuming with %d: data order and random "
            "draws will not match an uninterrupted run",
            path,
            manifest.world_size,
            world_size,
        )
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning(
            "no %s in %s (world size changed); RNG of rank %d left as is", rng_file.name, path, rank
        )
    return train_state


def check_trainable_tensors(
    path: Path,
    model: torch.nn.Module,
    *,
    compare_values: bool = True,
    expected: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Problems found comparing a step folder's trainable tensors with ``model``'s.

    Each must be present with the model parameter's full (global) shape and chunks covering all
    its elements, so a checkpoint holding one rank's slice of a sharded LoRA weight is caught.
    With ``compare_values`` the tensors are read back with DCP (a collective: call on every rank)
    and each rank compares its local shard with the model's, or with ``expected`` (the trainable
    state dict as it was when an asynchronous save started).
    """
    held = expected
    if held is None:
        held = _trainable_only(model, get_model_state_dict(model, options=_TRAINABLE))
    problems = []
    # One entry per Parameter: a tied one (a trained embedding that is also the output head)
    # is kept under its first name only (see _trainable_only).
    num_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if len(held) != num_trainable:
        problems.append(
            f"the model has {num_trainable} trainable tensors, its state dict {len(held)}"
        )
    metadata = FileSystemReader(str(Path(path) / DCP_DIR)).read_metadata()
    saved = {
        key.removeprefix("model."): value
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith("model.")
    }
    problems += [
        f"{name}: trainable in the model, absent from the checkpoint"
        for name in sorted(held.keys() - saved.keys())
    ]
    problems += [
        f"{name}: in the checkpoint, not trainable in the model"
        for name in sorted(saved.keys() - held.keys())
    ]
    for name in sorted(held.keys() & saved.keys()):
        problems += _whole_tensor_problems(name, saved[name], held[name].shape)
    if problems or not compare_values:
        return problems

    read_back = {name: torch.empty_like(tensor) for name, tensor in held.items()}
    _dcp_load({"model": read_back}, Path(path) / DCP_DIR)
    for name, tensor in held.items():
        if not torch.equal(_local(read_back[name]), _local(tensor)):
            problems.append(f"{name}: values read back differ from the model's")
    return problems


def _trainable_only(model: torch.nn.Module, state: dict) -> dict:
    """One entry per trainable Parameter, under its first name.

    Drops the frozen non-parameter entries ``ignore_frozen_params`` keeps (a 4-bit/8-bit
    bitsandbytes base writes absmax, quant_map, ... into the state dict), and the second name of
    a tied trainable Parameter (a fully trained embedding that is also the output head): that is
    the same tensor, restored in place through its first name, so the tie survives a resume.
    """
    trainable = {
        name.removeprefix("module.")
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    return {key: value for key, value in state.items() if key.removeprefix("module.") in trainable}


def _whole_tensor_problems(name: str, saved, shape: torch.Size) -> list[str]:
    if not isinstance(saved, TensorStorageMetadata):
        return [f"{name}: saved as {type(saved).__name__}, not a tensor"]
    if tuple(saved.size) != tuple(shape):
        return [f"{name}: saved with shape {list(saved.size)}, the model's is {list(shape)}"]
    covered = sum(math.prod(chunk.sizes) for chunk in saved.chunks)
    if covered != math.prod(shape):
        return [f"{name}: saved chunks cover {covered} of {math.prod(shape)} elements"]
    return []


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _dcp_save(state_dict: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with _single_process_quietly():
        dcp.save(
            state_dict,
            storage_writer=FileSystemWriter(folder, sync_files=True),
            no_dist=not is_distributed(),
        )


def _dcp_async_save(state_dict: dict, folder: Path) -> Future:
    folder.mkdir(parents=True, exist_ok=True)
    with _single_process_quietly():
        return dcp.async_save(
            state_dict,
            storage_writer=FileSystemWriter(folder, sync_files=True),
            process_group=_async_save_group(),
            no_dist=not is_distributed(),
        )


_ASYNC_SAVE_GROUPS: dict = {}


def _async_save_group():
    """A gloo group of all ranks for the background writes (None in one process).

    The write's collectives run in another thread; on the training's own group they would
    interleave with the loop's collectives, and async_save needs a CPU backend under NCCL too.
    Created on the first asynchronous save, which every rank reaches together.
    """
    if not is_distributed():
        return None
    world = dist.group.WORLD
    if _ASYNC_SAVE_GROUPS.get("world") is not world:
        _ASYNC_SAVE_GROUPS.update(world=world, group=dist.new_group(backend="gloo"))
    return _ASYNC_SAVE_GROUPS["group"]


def _cause(error: BaseException) -> str:
    """The root errors of a failed DCP save (its CheckpointException holds one per rank)."""
    if isinstance(error, CheckpointException):
        return "; ".join(
            f"{type(exc).__name__}: {exc} (DCP rank {rank})"
            for rank, (exc, _) in sorted(error.failures.items())
        )
    return f"{type(error).__name__}: {error}"


def _copied(value):
    """A copy of every tensor in a (nested) state dict; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copied(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(inner) for inner in value)
    return value


def _dcp_load(state_dict: dict, folder: Path) -> None:
    with _single_process_quietly():
        dcp.load(state_dict, storage_reader=FileSystemReader(folder), no_dist=not is_distributed())


@contextlib.contextmanager
def _single_process_quietly():
    # DCP warns on every call without a process group; single-process use is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _encode_train_state(train_state: dict) -> str:
    try:
        return json.dumps(train_state, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(
            f"train_state must be JSON-serialisable (numbers, strings, lists, dicts): {error}"
        ) from error


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _raise_if_any(problems: list[str], headline: str) -> None:
    if problems:
        raise CheckpointError(headline + ":\n  " + "\n  ".join(problems))

"""The one training engine: steps, checkpoints, stop signals, logging, resume and adapter saving.

``train_loop`` runs a stage's optimizer steps in order (batch, forward/backward per micro-batch,
clip, optimizer step, schedule, log, evaluate, checkpoint). A stage says what it trains with a
``TrainingData`` (its items, collate, window step returning a typed step result, log window and
the config a checkpoint may be resumed with); ``recipes/sft.py`` and ``recipes/dpo.py`` build
theirs and call this loop. A run resumes exactly from a checkpoint in OUTPUT_DIR/checkpoints
(``choose_resume_checkpoint``), and SIGTERM/SIGUSR1 make it save and stop after the current
optimizer step (``stop_signals_caught``). The rank comes from the ``DistContext``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from multitune.checkpoint import (
    CheckpointError,
    PendingCheckpoint,
    config_hash,
    find_resume_checkpoint,
    list_committed,
    load_checkpoint,
    read_manifest,
    start_checkpoint,
    verify_checkpoint,
)
from multitune.checkpoint.layout import TRAIN_STATE_FILE
from multitune.config.schema import RunConfig
from multitune.data.pipeline import TaskData
from multitune.distributed.batches import rank_micro_batches, rank_share
from multitune.distributed.process_group import DistContext, any_rank, one_process_or
from multitune.distributed.strategy import full_trainable_state, reshard
from multitune.evaluation.validation import TrainingEvaluation
from multitune.tracking.tracker import Tracker, peak_memory_gb, start_tracking
from multitune.training.progress import progress_bar
from multitune.training.schedule import build_optimizer, build_scheduler
from multitune.training.state import plan_batches
from multitune.training.step import clip_and_check

log = logging.getLogger(__name__)

# Resume policy: a checkpoint continues only the run that wrote it. These top-level keys shape
# the trained weights or the data order, so resuming with any of them changed is an error...
RESUME_FIXED_KEYS = ("seed", "model", "lora", "tasks", "data", "train")


# ...except these train keys, which only say how long the run goes and how it reports
# (extending max_steps or epochs continues the same data order; the schedule follows the new
# length from the resumed step on). output_dir, eval, checkpoint and resume may change freely.
RESUME_FREE_TRAIN_KEYS = (
    "max_steps",
    "log_every_steps",
    "progress_bar",
    "epochs",
)


# ...and this data key: sharing prompt prefixes computes the same loss and gradients (to
# rounding), so it may be switched on resume, and checkpoints saved before it existed resume.
RESUME_FREE_DATA_KEYS = ("share_prefix",)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainingData:
    """What one training stage feeds the loop; SFT's is ``sft_training_data``, DPO's in dpo.py.

    ``epoch_items(epoch)`` is the epoch's ordered items (a pure function of the seed and epoch, so
    a resumed run recomputes it); ``collate(items)`` makes one micro-batch of them;
    ``window_step(model, micro_batches)`` runs forward/backward over this rank's micro-batches of
    one accumulation window and returns what ``new_log_window()``'s ``add`` sums for logging;
    ``fixed_config`` is what a checkpoint of this stage may only be resumed with; ``filler(items)``
    a micro-batch that adds nothing, for a rank whose share of a short batch ran out (default:
    ``collate`` with every label ignored; see ``rank_micro_batches``).
    """

    num_examples: int
    epoch_items: Callable[[int], list]
    collate: Callable[[list], object]
    window_step: Callable[[torch.nn.Module, list], object]
    new_log_window: Callable[[], object]
    fixed_config: dict
    filler: Callable[[list], object] | None = None


def train_loop(
    model,
    tokenizer,
    tasks: list[TaskData],
    cfg: RunConfig,
    out: Path,
    device,
    resume_from: Path | None = None,
    stop_requests: list[str] | None = None,
    ctx: DistContext | None = None,
    evaluation: TrainingEvaluation | None = None,
    data: TrainingData | None = None,
    tracker: Tracker | None = None,
) -> bool:
    """Train to the planned step, saving checkpoints; False when a stop signal ended it early.

    ``stop_requests`` is filled by ``stop_signals_caught``: once non-empty (on any rank), the
    loop finishes the current optimizer step, saves a checkpoint, logs and returns False.
    ``evaluation`` scores the validation split every ``eval.every_steps`` and at the last step,
    and keeps OUTPUT_DIR/best/ (None: no evaluation during training). ``data`` is the stage's
    items and window step (``sft.sft_training_data``, ``dpo.dpo_training_data``); required.
    """
    ctx = one_process_or(ctx, device)
    if data is None:
        raise TypeError("train_loop needs the stage's TrainingData (see sft_training_data)")
    plan = plan_batches(cfg.train, data.num_examples, ctx.world_size)
    log.info("batch plan: %s", plan.describe())
    reshard(model)  # an evaluation before the loop may have left a group's whole tensors
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, plan.total_steps)
    step, first_epoch, first_position = 0, 0, 0
    if resume_from is not None:
        # Restores adapters, optimizer, scheduler and every RNG (LoRA dropout draws included).
        state = load_checkpoint(resume_from, model, optimizer, scheduler, verify=False)
        step, first_epoch, first_position = state["step"], state["epoch"], state["epoch_position"]
        log.info(
            "resumed from step %d (%s): epoch %d, %d examples into it",
            step,
            resume_from,
            first_epoch,
            first_position,
        )
    checkpoints = _CheckpointSchedule(cfg.checkpoint, step)
    fixed_config = data.fixed_config
    stop_requests = [] if stop_requests is None else stop_requests
    # A tracker passed in outlives the loop (the final evaluation is logged to it too); on
    # ranks other than 0 it logs nothing.
    logger = tracker if tracker is not None else start_tracking(cfg, out)
    window = data.new_log_window()
    pending = None  # a checkpoint still being written (checkpoint.async_save)
    model.train()
    try:
        show_progress = cfg.train.progress_bar and ctx.is_main
        with progress_bar(plan.total_steps, show_progress) as advance:
            advance(step, "")
            for epoch in range(first_epoch, cfg.train.epochs):
                # A pure function of (seed, epoch): a resumed run recomputes the same order.
                order = data.epoch_items(epoch)
                first = first_position if epoch == first_epoch else 0
                for start in range(first, len(order), plan.global_batch):
                    if step >= plan.total_steps:
                        break
                    chosen = order[start : start + plan.global_batch]
                    # This rank's share of the global batch (all of it in one process).
                    micro_batches = rank_micro_batches(
                        chosen, ctx, plan.micro_batch_size, data.collate, data.filler
                    )
                    if log.isEnabledFor(logging.DEBUG):
                        mine = rank_share(chosen, ctx.rank, ctx.world_size)
                        log.debug("step %d rank %d examples %s", step + 1, ctx.rank, list(mine))
                    result = data.window_step(model, micro_batches)
                    grad_norm = clip_and_check(model, cfg.train.max_grad_norm, step)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    window.add(result, grad_norm)
                    consumed = start + len(chosen)
                    fractional_epoch = epoch + min(1.0, consumed / len(order))
                    # Every rank must take these decisions together (collectives follow).
                    stopping, checkpoint_due = any_rank(
                        ctx, bool(stop_requests), checkpoints.due(step)
                    )
                    if (
                        step % cfg.train.log_every_steps == 0
                        or step == plan.total_steps
                        or stopping
                    ):
                        _log_train_record(
                            logger, window, advance, step, plan, fractional_epoch, scheduler, tasks
                        )
                    if evaluation is not None and evaluation.due(step, plan.total_steps):
                        logger.log(
                            evaluation.run(
                                model,
                                tokenizer,
                                step,
                                plan.total_steps,
                                fractional_epoch,
                                scheduler.get_last_lr()[0],
                                window.last_tokens_per_s,
                            )
                        )
                    # Saved last in the step, so its RNG state is the one the next step starts
                    # from in an uninterrupted run.
                    state = _train_state(step, epoch, consumed, len(order), fixed_config)
                    state["tracker_run_id"] = logger.run_id
                    if stopping or checkpoint_due:
                        pending = _save_checkpoint(
                            cfg, out, model, optimizer, scheduler, state, pending, ctx
                        )
                        checkpoints.saved(step)
                    if stopping:
                        _commit_checkpoint(cfg, out, pending, ctx)
                        signal_name = stop_requests[0] if stop_requests else "a stop signal"
                        log.info("%s received: stopped at step %d", signal_name, step)
                        return False
                    advance(1, "")
            if checkpoints.last_step != step:
                pending = _save_checkpoint(
                    cfg, out, model, optimizer, scheduler, state, pending, ctx
                )
            _commit_checkpoint(cfg, out, pending, ctx)
        return True
    finally:
        if tracker is None:
            logger.finish()


def _log_train_record(logger, window, advance, step, plan, epoch, scheduler, tasks) -> None:
    record = window.flush(step, epoch, scheduler.get_last_lr()[0], tasks)
    logger.log(record)
    advance(
        0,
        f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s",
    )
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
        step,
        plan.total_steps,
        record["loss"],
        record["lr"],
        record["tokens_per_s"],
    )


def resume_fixed_config(cfg: RunConfig) -> dict:
    """The part of the config a resumed run must share with the run that saved the checkpoint."""
    dumped = cfg.model_dump(mode="json")
    fixed = {key: dumped[key] for key in RESUME_FIXED_KEYS}
    fixed["train"] = {k: v for k, v in fixed["train"].items() if k not in RESUME_FREE_TRAIN_KEYS}
    fixed["data"] = {k: v for k, v in fixed["data"].items() if k not in RESUME_FREE_DATA_KEYS}
    return fixed


def choose_resume_checkpoint(
    cfg: RunConfig, out: Path, fixed: dict | None = None, ctx: DistContext | None = None
) -> Path | None:
    """The step folder to resume from per ``cfg.resume``, checked against the current config
    (``fixed``: the stage's fixed config, default ``resume_fixed_config(cfg)``). Under torchrun
    call it on every rank with ``ctx``."""
    root = out / "checkpoints"
    if cfg.resume == "never":
        if list_committed(root):
            log.warning("resume=never: starting over although %s holds checkpoints", root)
        return None
    if cfg.resume == "auto":
        path = find_resume_checkpoint(root)
        downloads = path is None and mirrors_checkpoints(cfg, out)
        if downloads and download_resume_checkpoint(cfg.hub.repo, root, one_process_or(ctx)):
            path = find_resume_checkpoint(root)  # verifies the downloaded files
    else:
        path = Path(cfg.resume)
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(
                f"resume={cfg.resume}: not a valid checkpoint: " + "; ".join(problems)
            )
    if path is not None:
        check_resume_config(path, cfg, fixed)
    return path


def download_resume_checkpoint(repo: str, root: Path, ctx: DistContext) -> bool:
    """Download the Hub's newest checkpoint into ``root`` once per node; True when there was one.

    Local rank 0 downloads (into a temporary folder, verified, then renamed to ``step-N``) while
    the node's other ranks wait: every rank downloading into the same ``step-N`` would race on
    the same files. The all-reduce that ends the wait also carries rank 0's outcome, so a failed
    download stops every rank instead of leaving them waiting until the timeout.
    """
    from multitune.hub.push import download_latest_checkpoint

    found, error = False, None
    if ctx.local_rank == 0:
        try:
            found = download_latest_checkpoint(repo, root) is not None
        except Exception as exc:  # raised below, once the other ranks know
            error = exc
    failed, found = any_rank(ctx, error is not None, found)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"resume from hub.repo {repo}: the download failed on another rank")
    return found


def mirrors_checkpoints(cfg: RunConfig, out: Path) -> bool:
    """hub.push_checkpoints mirrors the SFT stage (OUTPUT_DIR/checkpoints) only, not DPO's."""
    return cfg.hub.push_checkpoints and Path(out).resolve() == Path(cfg.output_dir).resolve()


def tracker_run_id(checkpoint: Path | None) -> str | None:
    """The tracker (W&B) run id saved with a checkpoint, so a resumed run continues that run."""
    if checkpoint is None:
        return None
    return json.loads((checkpoint / TRAIN_STATE_FILE).read_text()).get("tracker_run_id")


def check_resume_config(path: Path, cfg: RunConfig, fixed: dict | None = None) -> None:
    """Raise naming every fixed key (see RESUME_FIXED_KEYS) that differs from the checkpoint's."""
    current = fixed if fixed is not None else resume_fixed_config(cfg)
    if read_manifest(path).config_hash == config_hash(current):
        return
    saved = json.loads((path / TRAIN_STATE_FILE).read_text()).get("fixed_config")
    changed = _differing_keys(_flatten(saved), _flatten(current)) if saved else []
    raise CheckpointError(
        f"cannot resume from {path}: the config changed in keys that must stay as they were "
        f"({', '.join(changed) or 'unknown which: the checkpoint holds only a hash'}). Restore "
        "them, or start over with resume=never or a new output_dir"
    )


def _flatten(value, prefix: str = "") -> dict:
    """Dotted key -> leaf value; lists of sections (tasks) by index, other lists as leaves."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, inner in items:
        flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _differing_keys(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def _train_state(step: int, epoch: int, consumed: int, epoch_length: int, fixed: dict) -> dict:
    """Where training stands after ``step``: resuming continues at ``order[epoch_position]``."""
    if consumed >= epoch_length:
        epoch, consumed = epoch + 1, 0
    return {"step": step, "epoch": epoch, "epoch_position": consumed, "fixed_config": fixed}


def _save_checkpoint(
    cfg: RunConfig,
    out: Path,
    model,
    optimizer,
    scheduler,
    state: dict,
    pending: PendingCheckpoint | None,
    ctx: DistContext,
) -> PendingCheckpoint | None:
    """Commit ``pending`` (the previous save, still being written), then save this step: returns
    it uncommitted while ``checkpoint.async_save`` writes it in the background, else None."""
    _commit_checkpoint(cfg, out, pending, ctx)
    started = start_checkpoint(
        out / "checkpoints",
        state["step"],
        model,
        optimizer,
        scheduler,
        state,
        cfg.checkpoint.keep_last,
        config_hash=config_hash(state["fixed_config"]),
        write_async=cfg.checkpoint.async_save,
    )
    if cfg.checkpoint.async_save:
        return started
    _commit_checkpoint(cfg, out, started, ctx)
    return None


def _commit_checkpoint(
    cfg: RunConfig, out: Path, pending: PendingCheckpoint | None, ctx: DistContext
) -> None:
    """Wait for ``pending``'s write and commit it (a failed write raises CheckpointError)."""
    if pending is None:
        return
    path = pending.commit()
    if mirrors_checkpoints(cfg, out) and ctx.is_main:
        from multitune.hub.push import push_checkpoint

        push_checkpoint(path, cfg.hub.repo)


class _CheckpointSchedule:
    """When the next periodic checkpoint is due: every N steps and/or every N minutes."""

    def __init__(self, cfg, step: int) -> None:
        self.every_steps, self.every_minutes = cfg.every_steps, cfg.every_minutes
        self.saved(step)

    def saved(self, step: int) -> None:
        self.last_step, self.last_time = step, time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        minutes = (time.monotonic() - self.last_time) / 60
        return bool(self.every_minutes and minutes >= self.every_minutes)


@contextlib.contextmanager
def stop_signals_caught():
    """Yield a list that SIGTERM/SIGUSR1 append their name to, instead of ending the process.

    The loop polls it once per optimizer step; a second signal while saving only appends again.
    The previous handlers come back on exit. Signals can only be caught in the main thread.
    """
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def request_stop(signum, frame) -> None:
        requests.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LogWindow:
    """Training figures summed on device between log events (no per-step host sync)."""

    def __init__(self, num_tasks: int, device) -> None:
        self.num_tasks, self.device = num_tasks, device
        self.last_tokens_per_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.tokens = 0
        self.input_tokens = 0
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.steps = 0
        self.task_sums = torch.zeros(self.num_tasks, device=self.device)
        self.task_counts = torch.zeros(self.num_tasks, device=self.device)
        self.started = time.perf_counter()

    def add(self, result, grad_norm) -> None:
        self.loss_sum += result.loss * result.num_tokens
        self.tokens += result.num_tokens
        self.input_tokens += result.num_input_tokens
        self.grad_norm_sum += grad_norm.detach()
        self.steps += 1
        self.task_sums += result.task_loss_sums
        self.task_counts += result.task_token_counts

    def flush(self, step: int, epoch: float, lr: float, tasks: list[TaskData]) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.last_tokens_per_s = self.input_tokens / elapsed
        record = {
            "step": step,
            "epoch": round(epoch, 4),
            "split": "train",
            "loss": (self.loss_sum / self.tokens).item(),
            "lr": lr,
            "grad_norm": (self.grad_norm_sum / self.steps).item(),
            "tokens_per_s": self.last_tokens_per_s,
            "answer_tokens_per_s": self.tokens / elapsed,
            "peak_memory_gb": peak_memory_gb(self.device),
        }
        sums, counts = self.task_sums.tolist(), self.task_counts.tolist()
        for task, total, count in zip(tasks, sums, counts):
            if count:
                record[f"task/{task.spec.name}/loss"] = total / count
        self._reset()
        return record


def save_adapter_from_all_ranks(model, tokenizer, path: Path, out: Path, ctx: DistContext) -> None:
    """Call on every rank: gathers a sharded model's whole trainable tensors (a collective),
    then rank 0 writes the adapter folder."""
    state = full_trainable_state(model) if ctx.initialized else None
    if ctx.is_main:
        save_adapter(model, tokenizer, path, out / "base_model", state)


def save_adapter(
    model, tokenizer, path: Path, saved_base: Path, state_dict: dict | None = None
) -> None:
    """A standard PEFT adapter folder plus the tokenizer; ``state_dict``: the gathered whole
    trainable tensors of a sharded model (the model's own are DTensor shards)."""
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    if saved_base.is_dir():
        # Point the adapter at the saved built-in base, so AutoPeftModel can load it.
        config_path = path / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(saved_base.resolve())
        config_path.write_text(json.dumps(config, indent=2))

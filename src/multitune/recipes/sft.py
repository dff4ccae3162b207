"""Supervised multi-task fine-tuning with LoRA: setup -> loop -> evaluate -> save.

Read top to bottom: every stage of a run is one call in ``run``, and the loop shows each step
(batch, forward/backward per micro-batch, clip, optimizer step, schedule, log, checkpoint) in
order. A run resumes exactly from a checkpoint in OUTPUT_DIR/checkpoints (see ``resume`` in the
config), and SIGTERM/SIGUSR1 make it save and stop after the current optimizer step.

Under torchrun every process runs this same function: the model is sharded or replicated per
``distributed.strategy`` (``multitune.distributed``), each rank trains on its share of every
global batch, and only rank 0 writes outputs.
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
from multitune.checkpoint.ranks import rank_and_world_size
from multitune.config.loader import dump_config
from multitune.config.schema import RunConfig, check_quantization_for_sharding
from multitune.data.mixing import epoch_order, task_probabilities
from multitune.data.packing import micro_batch
from multitune.data.pipeline import TaskData, load_tasks, tokenize_tasks, training_corpus
from multitune.distributed.batches import (
    global_answer_tokens,
    rank_micro_batches,
    rank_share,
    sum_step_results,
)
from multitune.distributed.process_group import (
    DistContext,
    any_rank,
    destroy_distributed,
    init_distributed,
    local_rank_zero_first,
)
from multitune.distributed.strategy import (
    apply_strategy,
    choose_strategy,
    frozen_bytes,
    full_trainable_state,
)
from multitune.evaluation.report import print_summary, write_eval_results
from multitune.evaluation.runner import evaluate_tasks
from multitune.evaluation.validation import TrainingEvaluation
from multitune.hub.card import write_model_card
from multitune.models.loading import load_model_and_tokenizer
from multitune.models.lora import apply_lora, count_parameters
from multitune.models.tiny import TINY_MODEL_NAME
from multitune.preflight.registry import check_preflight
from multitune.tracking.plots import write_plots
from multitune.tracking.tracker import Tracker, peak_memory_gb, start_tracking
from multitune.training.compile import compiled_decoder
from multitune.training.progress import progress_bar
from multitune.training.schedule import build_optimizer, build_scheduler
from multitune.training.state import plan_batches, seed_everything
from multitune.training.step import accumulate_gradients, clip_and_check

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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def run(cfg: RunConfig, ctx: DistContext | None = None) -> dict:
    """Train, evaluate and save one run; returns the final eval results.

    Resumes per ``cfg.resume``. After SIGTERM/SIGUSR1 it saves a checkpoint and returns ``{}``
    without the final evaluation. Under torchrun, call it in every process (ranks > 0 return
    ``{}``); ``ctx``: a process group the caller started and will end (SFT then DPO).
    """
    check_preflight(cfg)  # tokens, hub access, disk, launch: all failures before any loading
    if ctx is not None:
        return _run(cfg, ctx)
    ctx = init_distributed(cfg.distributed)
    try:
        return _run(cfg, ctx)
    finally:
        destroy_distributed(ctx)


def _run(cfg: RunConfig, ctx: DistContext) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Before any expensive setup, so a changed config fails in a second.
    resume_from = choose_resume_checkpoint(cfg, out)
    # Credentials were checked by check_preflight; W&B (rank 0) starts before any loading.
    tracker = start_tracking(cfg, out, tracker_run_id(resume_from))
    if ctx.is_main:
        (out / "config.yaml").write_text(dump_config(cfg))
    # The same seed on every rank: replicated LoRA weights must start equal.
    seed_everything(cfg.seed)
    started = time.perf_counter()

    device = ctx.device
    with local_rank_zero_first(ctx):  # hub downloads once per node
        tasks = load_tasks(cfg)
        # Checks eval.best_metric against the tasks' metrics now, before the model loads.
        # ``save`` reads ``model`` when called, so it saves the LoRA-wrapped model of the loop.
        evaluation = TrainingEvaluation(
            cfg,
            tasks,
            out,
            save=lambda path: save_adapter_from_all_ranks(model, tokenizer, path, out, ctx),
            resumed=resume_from is not None,
            is_main=ctx.is_main,
        )
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, training_corpus(tasks), cfg.seed, device
        )
    tokenize_tasks(tasks, tokenizer, cfg)
    if ctx.is_main:
        (out / "data_report.json").write_text(
            json.dumps({t.spec.name: t.report() for t in tasks}, indent=2)
        )
    if cfg.model.name == TINY_MODEL_NAME and ctx.is_main:
        # The built-in base exists nowhere else; keep it so the adapter can be reloaded.
        model.save_pretrained(out / "base_model")
        tokenizer.save_pretrained(out / "base_model")

    model = prepare_for_training(model, cfg)
    trainable, total = count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )

    if ctx.initialized:
        base_bytes = frozen_bytes(model)  # before the tie is separated below
    separate_tied_frozen_parameters(model)  # after counting: a tie still holds one tensor
    if ctx.initialized:
        strategy, why = choose_strategy(cfg.distributed.strategy, base_bytes, ctx)
        log.info("distributed strategy %s (%s)", strategy, why)
        if strategy in ("fsdp", "hsdp"):
            check_quantization_for_sharding(cfg.model)
        mesh = apply_strategy(model, strategy, ctx)
        log.info(
            "device mesh: %s",
            " x ".join(f"{n} {k}" for n, k in zip(mesh.mesh_dim_names, mesh.shape)),
        )
        # Own dropout draws per rank from here on (a checkpoint saves every rank's RNG).
        seed_everything(cfg.seed + ctx.rank)

    # Evaluation runs on every rank in lockstep over the same examples (sharded layers
    # all-gather in each forward, so all ranks must run the same forwards); rank 0 writes.
    base_results = None
    if cfg.eval.before_training:
        with model.disable_adapter():
            base_results = evaluate_tasks(model, tokenizer, tasks, cfg, split="validation")

    with stop_signals_caught() as stop_requests:
        finished = train_loop(
            model,
            tokenizer,
            tasks,
            cfg,
            out,
            device,
            resume_from,
            stop_requests,
            ctx,
            evaluation,
            tracker=tracker,
        )
    if not finished:
        tracker.finish()
        log.info(
            "stopped by %s after saving a checkpoint; run again to resume (final evaluation "
            "skipped)",
            stop_requests[0] if stop_requests else "a signal to another rank",
        )
        return {}

    # The loop's evaluation at the last step is the final one (none when resumed at the end).
    final = evaluation.final_results or evaluate_tasks(
        model,
        tokenizer,
        tasks,
        cfg,
        split="validation",
        confusion_dir=out / "confusion" if ctx.is_main else None,
    )
    save_adapter_from_all_ranks(model, tokenizer, out / "adapter", out, ctx)
    if not ctx.is_main:
        return {}
    results = write_eval_results(out, final, "validation", "adapter", base_results, tasks)
    print_summary(tasks, results)
    tracker.log_evaluation(results, out / "confusion")
    publish_run(cfg, out)
    tracker.finish()
    log.info("run finished in %.1f s; outputs in %s", time.perf_counter() - started, out)
    return results


def prepare_for_training(model, cfg: RunConfig):
    """Freeze the base and add the LoRA adapters; gradient checkpointing when configured."""
    model = apply_lora(model, cfg.lora)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


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


def sft_training_data(
    model, tokenizer, tasks: list[TaskData], cfg: RunConfig, device, ctx: DistContext
) -> TrainingData:
    """The mixed multi-task examples, padded or packed (``data.packing``) per micro-batch, with
    token-exact SFT accumulation over all ranks through the model's (optionally compiled)
    decoder."""
    sizes = [len(t.tokenized["train"]) for t in tasks]
    probabilities = task_probabilities(sizes, cfg.data, [t.sampling_weight for t in cfg.tasks])
    loss_weights = torch.tensor([t.spec.loss_weight for t in tasks], device=device)
    pad_id = tokenizer.pad_token_id

    def epoch_items(epoch: int) -> list:
        return epoch_order(sizes, probabilities, cfg.seed, epoch)  # (task, example) pairs

    def collate_ids(ids) -> dict:
        examples = [tasks[t].tokenized["train"][i] for t, i in ids]
        return micro_batch(examples, pad_id, cfg.data, cfg.seed)

    decoder = compiled_decoder(model, cfg.train.compile)

    def window_step(model, batches):
        # Every rank divides by the answer tokens of the whole global batch.
        window_tokens = global_answer_tokens(ctx, batches) if ctx.initialized else None
        result = accumulate_gradients(
            model, batches, loss_weights, len(tasks), window_tokens, decoder
        )
        return sum_step_results(ctx, result)

    return TrainingData(
        sum(sizes),
        epoch_items,
        collate_ids,
        window_step,
        lambda: _LogWindow(len(tasks), device),
        resume_fixed_config(cfg),
    )


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
    items and window step (default: SFT on the tasks' training examples).
    """
    ctx = ctx or DistContext(device=device)
    data = data or sft_training_data(model, tokenizer, tasks, cfg, device, ctx)
    plan = plan_batches(cfg.train, data.num_examples, ctx.world_size)
    log.info("batch plan: %s", plan.describe())
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
                            cfg, out, model, optimizer, scheduler, state, pending
                        )
                        checkpoints.saved(step)
                    if stopping:
                        _commit_checkpoint(cfg, out, pending)
                        signal_name = stop_requests[0] if stop_requests else "a stop signal"
                        log.info("%s received: stopped at step %d", signal_name, step)
                        return False
                    advance(1, "")
            if checkpoints.last_step != step:
                pending = _save_checkpoint(cfg, out, model, optimizer, scheduler, state, pending)
            _commit_checkpoint(cfg, out, pending)
        return True
    finally:
        if tracker is None:
            logger.finish()


def separate_tied_frozen_parameters(model) -> None:
    """Give each further name of a frozen tied Parameter its own Parameter over the same storage.

    Workaround for the checkpointer: torch's ``get_state_dict(ignore_frozen_params=True)`` drops
    frozen tensors by walking ``named_parameters()``, which skips the second name of a tied
    Parameter, so a tied ``lm_head.weight`` stayed in the state dict and the checkpointer refused
    to commit (one tensor more than the trainable ones). A separate Parameter object sharing the
    storage is seen and dropped; memory and numerics are unchanged. Remove once the checkpointer
    filters by ``named_parameters(remove_duplicate=False)``.
    """
    seen = set()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad:
                continue
            if id(param) in seen:
                setattr(module, name, torch.nn.Parameter(param.detach(), requires_grad=False))
            seen.add(id(param))


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
    return fixed


def choose_resume_checkpoint(cfg: RunConfig, out: Path, fixed: dict | None = None) -> Path | None:
    """The step folder to resume from per ``cfg.resume``, checked against the current config
    (``fixed``: the stage's fixed config, default ``resume_fixed_config(cfg)``)."""
    root = out / "checkpoints"
    if cfg.resume == "never":
        if list_committed(root):
            log.warning("resume=never: starting over although %s holds checkpoints", root)
        return None
    if cfg.resume == "auto":
        path = find_resume_checkpoint(root)
        if path is None and mirrors_checkpoints(cfg, out):
            from multitune.hub.push import download_latest_checkpoint

            if download_latest_checkpoint(cfg.hub.repo, root) is not None:
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


def publish_run(cfg: RunConfig, out: Path) -> None:
    """Plots and the model card (OUTPUT_DIR/README.md, pushed or not), then the push if
    configured."""
    write_plots(out)
    write_model_card(out)
    if cfg.hub.push:
        from multitune.hub.push import push_run

        push_run(out, cfg.hub.repo, private=cfg.hub.private)


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
) -> PendingCheckpoint | None:
    """Commit ``pending`` (the previous save, still being written), then save this step: returns
    it uncommitted while ``checkpoint.async_save`` writes it in the background, else None."""
    _commit_checkpoint(cfg, out, pending)
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
    _commit_checkpoint(cfg, out, started)
    return None


def _commit_checkpoint(cfg: RunConfig, out: Path, pending: PendingCheckpoint | None) -> None:
    """Wait for ``pending``'s write and commit it (a failed write raises CheckpointError)."""
    if pending is None:
        return
    path = pending.commit()
    if mirrors_checkpoints(cfg, out) and rank_and_world_size()[0] == 0:
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


class _LogWindow:
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

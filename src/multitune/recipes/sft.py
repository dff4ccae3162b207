"""Supervised multi-task fine-tuning with LoRA: setup -> loop -> evaluate -> save.

Read top to bottom: every stage of a run is one call in ``run``. The loop itself (batch,
forward/backward per micro-batch, clip, optimizer step, schedule, log, checkpoint) is the engine
in ``training/loop.py``; this recipe feeds it the mixed multi-task examples and the SFT window
step (``sft_training_data``). A run resumes exactly from a checkpoint in OUTPUT_DIR/checkpoints
(see ``resume`` in the config), and SIGTERM/SIGUSR1 make it save and stop after the current
optimizer step.

Under torchrun every process runs this same function: the model is sharded or replicated per
``distributed.strategy`` (``multitune.distributed``), each rank trains on its share of every
global batch, and only rank 0 writes outputs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from multitune.config.loader import dump_config
from multitune.config.schema import RunConfig
from multitune.data.mixing import epoch_order, task_probabilities
from multitune.data.packing import micro_batch
from multitune.data.pipeline import (
    TaskData,
    choose_prefix_sharing,
    load_tasks,
    tokenize_tasks,
    training_corpus,
)
from multitune.data.prefix_sharing import row_width_scale
from multitune.distributed.batches import global_answer_tokens, sum_step_results
from multitune.distributed.process_group import (
    DistContext,
    destroy_distributed,
    init_distributed,
    local_rank_zero_first,
)
from multitune.distributed.strategy import distribute
from multitune.evaluation.report import print_summary, write_eval_results
from multitune.evaluation.runner import evaluate_tasks
from multitune.evaluation.validation import TrainingEvaluation
from multitune.hub.card import write_model_card
from multitune.models.loading import load_model_and_tokenizer, resolve_attn_implementation
from multitune.models.lora import adapters_disabled, apply_lora, count_parameters
from multitune.models.tiny import TINY_MODEL_NAME
from multitune.preflight.registry import check_preflight
from multitune.tracking.plots import write_plots
from multitune.tracking.tracker import start_tracking
from multitune.training.compile import compiled_decoder
from multitune.training.loop import (
    LogWindow,
    TrainingData,
    choose_resume_checkpoint,
    resume_fixed_config,
    save_adapter_from_all_ranks,
    stop_signals_caught,
    tracker_run_id,
    train_loop,
)
from multitune.training.state import seed_everything
from multitune.training.step import accumulate_gradients

log = logging.getLogger(__name__)


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
    resume_from = choose_resume_checkpoint(cfg, out, ctx=ctx)
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
    choose_prefix_sharing(tasks, cfg, resolve_attn_implementation(cfg.model, device))
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
        distribute(model, cfg.distributed, cfg.model, ctx)
        # Own dropout draws per rank from here on (a checkpoint saves every rank's RNG).
        seed_everything(cfg.seed + ctx.rank)

    # Evaluation runs on every rank in lockstep over the same examples (sharded layers
    # all-gather in each forward, so all ranks must run the same forwards); rank 0 writes.
    base_results = None
    if cfg.eval.before_training:
        with adapters_disabled(model):
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
            data=sft_training_data(model, tokenizer, tasks, cfg, device, ctx),
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
    prefix_lengths = [t.prefix_to_share for t in tasks]
    # A compiled decoder runs one masked attention call over the row (models.attention), whose
    # cost grows with the row: it keeps rows of data.max_seq_len (fewer shapes to compile too).
    width_scale = None if cfg.train.compile else row_width_scale(model.config)

    def epoch_items(epoch: int) -> list:
        return epoch_order(sizes, probabilities, cfg.seed, epoch)  # (task, example) pairs

    def collate_ids(ids) -> dict:
        examples = [tasks[t].tokenized["train"][i] for t, i in ids]
        return micro_batch(examples, pad_id, cfg.data, cfg.seed, prefix_lengths, width_scale)

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
        lambda: LogWindow(len(tasks), device),
        resume_fixed_config(cfg),
    )


def publish_run(cfg: RunConfig, out: Path) -> None:
    """Plots and the model card (OUTPUT_DIR/README.md, pushed or not), then the push if
    configured."""
    write_plots(out)
    write_model_card(out)
    if cfg.hub.push:
        from multitune.hub.push import push_run

        push_run(out, cfg.hub.repo, private=cfg.hub.private)

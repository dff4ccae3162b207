"""Supervised multi-task fine-tuning with LoRA: setup -> loop -> evaluate -> save.

Read top to bottom: every stage of a run is one call in ``run``, and the loop shows each step
(batch, forward/backward per micro-batch, clip, optimizer step, schedule, log) in order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from multitune.config.loader import dump_config
from multitune.config.schema import RunConfig
from multitune.data.batching import collate
from multitune.data.mixing import epoch_order, task_probabilities
from multitune.data.pipeline import TaskData, load_tasks, tokenize_tasks, training_corpus
from multitune.evaluation.report import print_summary, write_eval_results
from multitune.evaluation.runner import evaluate_tasks
from multitune.models.loading import load_model_and_tokenizer, pick_device
from multitune.models.lora import apply_lora, count_parameters
from multitune.models.tiny import TINY_MODEL_NAME
from multitune.tracking.jsonl import JsonlLogger
from multitune.training.progress import progress_bar
from multitune.training.schedule import build_optimizer, build_scheduler
from multitune.training.state import plan_batches, seed_everything
from multitune.training.step import accumulate_gradients, clip_and_check

log = logging.getLogger(__name__)


def run(cfg: RunConfig) -> dict:
    """Train, evaluate and save one run; returns the final eval results."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without this, each torchrun worker would train its own full copy of the run.
        raise RuntimeError(
            "multi-process training (torchrun with WORLD_SIZE > 1) is not implemented yet; "
            "run `multitune train` as one process"
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.seed)
    started = time.perf_counter()

    tasks = load_tasks(cfg)
    device = pick_device()
    model, tokenizer = load_model_and_tokenizer(cfg.model, training_corpus(tasks), cfg.seed, device)
    tokenize_tasks(tasks, tokenizer, cfg)
    (out / "data_report.json").write_text(
        json.dumps({t.spec.name: t.report() for t in tasks}, indent=2)
    )
    if cfg.model.name == TINY_MODEL_NAME:
        # The built-in base exists nowhere else; keep it so the adapter can be reloaded.
        model.save_pretrained(out / "base_model")
        tokenizer.save_pretrained(out / "base_model")

    model = apply_lora(model, cfg.lora)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )

    base_results = None
    if cfg.eval.before_training:
        with model.disable_adapter():
            base_results = evaluate_tasks(model, tokenizer, tasks, cfg, split="validation")

    train_loop(model, tokenizer, tasks, cfg, out, device)

    final = evaluate_tasks(
        model, tokenizer, tasks, cfg, split="validation", confusion_dir=out / "confusion"
    )
    save_adapter(model, tokenizer, out / "adapter", out / "base_model")
    results = write_eval_results(out, final, "validation", "adapter", base_results, tasks)
    print_summary(tasks, results)
    log.info("run finished in %.1f s; outputs in %s", time.perf_counter() - started, out)
    return results


def train_loop(model, tokenizer, tasks: list[TaskData], cfg: RunConfig, out: Path, device) -> None:
    sizes = [len(t.tokenized["train"]) for t in tasks]
    probabilities = task_probabilities(sizes, cfg.data, [t.sampling_weight for t in cfg.tasks])
    plan = plan_batches(cfg.train, sum(sizes))
    log.info("batch plan: %s", plan.describe())
    loss_weights = torch.tensor([t.spec.loss_weight for t in tasks], device=device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, plan.total_steps)
    logger = JsonlLogger(out / "metrics.jsonl")
    window = _LogWindow(len(tasks), device)
    pad_id = tokenizer.pad_token_id
    model.train()
    step = 0
    try:
        with progress_bar(plan.total_steps, cfg.train.progress_bar) as advance:
            for epoch in range(cfg.train.epochs):
                order = epoch_order(sizes, probabilities, cfg.seed, epoch)
                for start in range(0, len(order), plan.global_batch):
                    if step >= plan.total_steps:
                        break
                    chosen = [
                        tasks[t].tokenized["train"][i]
                        for t, i in order[start : start + plan.global_batch]
                    ]
                    micro_batches = [
                        collate(chosen[i : i + plan.micro_batch_size], pad_id)
                        for i in range(0, len(chosen), plan.micro_batch_size)
                    ]
                    result = accumulate_gradients(model, micro_batches, loss_weights, len(tasks))
                    grad_norm = clip_and_check(model, cfg.train.max_grad_norm, step)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    window.add(result, grad_norm)
                    fractional_epoch = epoch + min(1.0, (start + len(chosen)) / len(order))
                    if step % cfg.train.log_every_steps == 0 or step == plan.total_steps:
                        record = window.flush(
                            step, fractional_epoch, scheduler.get_last_lr()[0], tasks
                        )
                        logger.log(record)
                        advance(
                            0,
                            f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                            f"{record['tokens_per_s']:.0f} tok/s",
                        )
                        log.info(
                            "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
                            step,
                            plan.total_steps,
                            record["loss"],
                            record["lr"],
                            record["tokens_per_s"],
                        )
                    every = cfg.train.eval_every_steps
                    if (every and step % every == 0) or step == plan.total_steps:
                        logger.log(
                            _validation_record(
                                model,
                                tokenizer,
                                tasks,
                                cfg,
                                step,
                                fractional_epoch,
                                scheduler,
                                window,
                            )
                        )
                    advance(1, "")
    finally:
        logger.close()


def _validation_record(model, tokenizer, tasks, cfg, step, epoch, scheduler, window) -> dict:
    results = evaluate_tasks(
        model, tokenizer, tasks, cfg, split="validation", with_predictions=False
    )
    losses = [r["loss"] * r["n"] for r in results.values()]
    record = {
        "step": step,
        "epoch": round(epoch, 4),
        "split": "validation",
        "loss": sum(losses) / sum(r["n"] for r in results.values()),
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": window.last_tokens_per_s,
    }
    for name, values in results.items():
        record[f"task/{name}/loss"] = values["loss"]
        record[f"task/{name}/perplexity"] = values["perplexity"]
    return record


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
        }
        sums, counts = self.task_sums.tolist(), self.task_counts.tolist()
        for task, total, count in zip(tasks, sums, counts):
            if count:
                record[f"task/{task.spec.name}/loss"] = total / count
        self._reset()
        return record


def save_adapter(model, tokenizer, path: Path, saved_base: Path) -> None:
    """A standard PEFT adapter folder plus the tokenizer."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if saved_base.is_dir():
        # Point the adapter at the saved built-in base, so AutoPeftModel can load it.
        config_path = path / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(saved_base.resolve())
        config_path.write_text(json.dumps(config, indent=2))

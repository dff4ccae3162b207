"""DPO after SFT: pairs -> reference log-probs (cached) -> the engine loop -> evaluate -> save.

Starts from an SFT adapter (OUTPUT_DIR/adapter after ``stages: [sft, dpo]``, or
``multitune dpo CONFIG --adapter PATH``) and trains it further with ``dpo.train``'s settings.
The loop is the engine's ``training.loop.train_loop``, fed the pairs and the DPO window step, so
checkpointing, resume, stop signals and logging are the SFT ones. No reference model is held in
memory: the starting policy's log-probs of every training pair are computed once, before training, and
cached on disk under a fingerprint of the tokenized pairs and the starting adapter's files.

Under torchrun every process runs this function, distributed as SFT is (``distributed.strategy``,
each rank trains on its share of every global batch): the pairs are built on every rank in
lockstep and rank 0's copy is broadcast, so all ranks train on the same pairs; each rank scores
its share of the reference batches; the loss of a window is divided by the pairs of the whole
global batch. Only rank 0 writes files.

Outputs: OUTPUT_DIR/dpo_pairs.jsonl, and OUTPUT_DIR/dpo/ with adapter/, checkpoints/,
metrics.jsonl, pairs_report.json, reference_logprobs.pt and confusion/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel

from multitune.config.schema import RunConfig
from multitune.data import preference
from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
from multitune.distributed.process_group import (
    DistContext,
    any_rank,
    destroy_distributed,
    init_distributed,
    local_rank_zero_first,
    one_process_or,
    sum_over_ranks,
)
from multitune.distributed.strategy import distribute, full_trainable_state
from multitune.evaluation.report import print_summary, write_eval_results
from multitune.evaluation.runner import evaluate_tasks
from multitune.evaluation.scoring import by_length
from multitune.models.loading import load_model_and_tokenizer, resolve_attn_implementation
from multitune.models.lora import adapters_disabled, disable_dropout
from multitune.training.dpo_step import (
    DpoStepResult,
    FillerPairs,
    TokenizedPair,
    dpo_window_step,
    pair_logprobs,
    sequence_logprobs,
    share_pair_prompts,
)
from multitune.training.loop import (
    RESUME_FREE_TRAIN_KEYS,
    TrainingData,
    choose_resume_checkpoint,
    resume_fixed_config,
    save_adapter,
    stop_signals_caught,
    train_loop,
)
from multitune.training.state import seed_everything

log = logging.getLogger(__name__)
STAGE_DIR = "dpo"
# A task whose accuracy falls by more than this from SFT to DPO is reported as a warning.
REGRESSION_POINTS = 0.02
REFERENCE_CACHE = "reference_logprobs.pt"


def stage_config(cfg: RunConfig) -> RunConfig:
    """The run config as the shared loop sees it during DPO: ``train`` = ``dpo.train``.

    ``resume`` set to a step folder applies to the stage whose checkpoints hold it; for a folder
    of the SFT stage, DPO resumes ``auto``.
    """
    resume = cfg.resume
    own = (Path(cfg.output_dir) / STAGE_DIR / "checkpoints").resolve()
    if resume not in ("auto", "never") and Path(resume).resolve().parent != own:
        resume = "auto"
    return cfg.model_copy(update={"train": cfg.dpo.train, "resume": resume})


def dpo_fixed_config(cfg: RunConfig, adapter: Path) -> dict:
    """A DPO checkpoint resumes only with the same model/data/tasks, dpo.train and dpo keys, and
    the same starting adapter (by content)."""
    fixed = resume_fixed_config(stage_config(cfg))
    fixed["start_adapter"] = adapter_fingerprint(adapter)
    dpo = cfg.dpo.model_dump(mode="json")
    dpo["train"] = {k: v for k, v in dpo["train"].items() if k not in RESUME_FREE_TRAIN_KEYS}
    fixed["dpo"] = dpo
    return fixed


def run(
    cfg: RunConfig, adapter: Path, previous: dict | None = None, ctx: DistContext | None = None
) -> dict:
    """DPO from ``adapter``; returns the eval results (``previous``: the SFT stage's, if any;
    ``{}`` on ranks > 0 after SFT). Under torchrun, call it in every process; ``ctx``: a process
    group the caller started and will end (``multitune train`` runs both stages in one).

    After SIGTERM/SIGUSR1 it saves a checkpoint and returns ``{}``; ranks > 0 return ``{}``.
    """
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    if ctx is not None:
        return _run(cfg, adapter, previous, ctx)
    ctx = init_distributed(cfg.distributed)
    try:
        return _run(cfg, adapter, previous, ctx)
    finally:
        destroy_distributed(ctx)


def _run(cfg: RunConfig, adapter: Path, previous: dict | None, ctx: DistContext) -> dict:
    out = Path(cfg.output_dir)
    stage_dir = out / STAGE_DIR
    stage_dir.mkdir(parents=True, exist_ok=True)
    fixed = dpo_fixed_config(cfg, adapter)
    resume_from = choose_resume_checkpoint(stage_config(cfg), stage_dir, fixed, ctx)
    seed_everything(cfg.seed)
    started = time.perf_counter()

    device = ctx.device
    saved_base = adapter.parent / "base_model"
    with local_rank_zero_first(ctx):  # hub downloads once per node
        tasks = load_tasks(cfg, include_test=False)
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, training_corpus(tasks), cfg.seed, device, saved_base=saved_base
        )
    tokenize_tasks(tasks, tokenizer, cfg)
    model = load_policy(model, adapter)
    if ctx.initialized:
        distribute(model, cfg.distributed, cfg.model, ctx)

    # Every rank scores the same examples in lockstep (sharded layers all-gather in each
    # forward); rank 0's pairs are then everyone's, so no rounding difference can split them.
    pairs = broadcast_from_rank_zero(ctx, build_pairs(model, tokenizer, tasks, cfg))
    if ctx.is_main:
        preference.write_pairs(out / "dpo_pairs.jsonl", pairs)
    tokenized, report = {}, {}
    for split, split_pairs in pairs.items():
        tokenized[split], dropped = preference.tokenize_pairs(split_pairs, tokenizer, cfg)
        tokenized[split] = share_pair_prompts(
            tokenized[split], cfg.data.share_prefix, resolve_attn_implementation(cfg.model, device)
        )
        report[split] = {"pairs": len(split_pairs), "kept": len(tokenized[split])}
        # Prompt tokens a forward computes once per pair (data.share_prefix); 0: unshared.
        shared = [p.shared_prompt for p in tokenized[split]]
        report[split]["mean_shared_prompt_tokens"] = round(sum(shared) / max(1, len(shared)), 2)
        report[split]["dropped"] = dict(dropped)
        if dropped:
            log.warning(
                "dpo pairs [%s]: dropped %s of %d (data.max_seq_len=%d)",
                split,
                dict(dropped),
                len(split_pairs),
                cfg.data.max_seq_len,
            )
    if ctx.is_main:
        (stage_dir / "pairs_report.json").write_text(json.dumps(report, indent=2))
    if not tokenized["train"]:
        raise ValueError(f"no DPO training pairs left ({report['train']}); see dpo.* settings")

    pad_id = tokenizer.pad_token_id
    batch_size = cfg.eval.batch_size
    cache = stage_dir / REFERENCE_CACHE
    reference = reference_logprobs(
        model, tokenized["train"], pad_id, batch_size, cache, adapter, ctx
    ).to(device)
    before = preference_accuracy(model, tokenized["validation"], pad_id, batch_size, ctx)
    if previous is None:
        previous = starting_results(model, tokenizer, tasks, cfg, adapter)
    if ctx.initialized:
        # Own dropout draws per rank from here on (a checkpoint saves every rank's RNG).
        seed_everything(cfg.seed + ctx.rank)

    data = dpo_training_data(tokenized["train"], reference, cfg, pad_id, device, fixed, ctx)
    with stop_signals_caught() as stop_requests:
        finished = train_loop(
            model,
            tokenizer,
            tasks,
            stage_config(cfg),
            stage_dir,
            device,
            resume_from,
            stop_requests,
            ctx,
            data=data,
        )
    if not finished:
        log.info("stopped by %s after saving a DPO checkpoint; run again to resume", stop_requests)
        return {}

    final = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        cfg,
        split="validation",
        confusion_dir=stage_dir / "confusion" if ctx.is_main else None,
    )
    after = preference_accuracy(model, tokenized["validation"], pad_id, batch_size, ctx)
    # Gathering a sharded model's whole adapter is a collective: every rank takes part.
    state = full_trainable_state(model) if ctx.initialized else None
    if not ctx.is_main:
        return {}
    save_adapter(model, tokenizer, stage_dir / "adapter", saved_base, state)
    regressions = accuracy_regressions(previous["tasks"], final)
    for name, (sft_accuracy, dpo_accuracy) in regressions.items():
        log.warning(
            "DPO lowered task %s's accuracy from %.3f to %.3f (more than %.0f points): the "
            "SFT adapter (adapter/) may be the better one; see README, DPO",
            name,
            sft_accuracy,
            dpo_accuracy,
            100 * REGRESSION_POINTS,
        )
    results = write_eval_results(
        out,
        previous["tasks"],
        "validation",
        previous.get("adapter"),
        (previous.get("base") or {}).get("tasks"),
        tasks,
        dpo={
            "tasks": final,
            "adapter": f"{STAGE_DIR}/adapter",
            "preference": {
                "n": len(tokenized["validation"]),
                "accuracy_before": before,
                "accuracy_after": after,
            },
            "warnings": [
                f"task {name}: accuracy {before_dpo:.3f} after SFT -> {after_dpo:.3f} after DPO"
                for name, (before_dpo, after_dpo) in regressions.items()
            ],
        },
    )
    print_summary(tasks, results)
    log.info(
        "DPO finished in %.1f s; held-out preference accuracy %s -> %s; outputs in %s",
        time.perf_counter() - started,
        before,
        after,
        stage_dir,
    )
    return results


def accuracy_regressions(sft: dict, dpo: dict) -> dict[str, tuple[float, float]]:
    """Tasks whose accuracy fell by more than ``REGRESSION_POINTS`` from SFT to DPO:
    name -> (SFT accuracy, DPO accuracy)."""
    return {
        name: (sft[name]["accuracy"], metrics["accuracy"])
        for name, metrics in dpo.items()
        if "accuracy" in metrics
        and "accuracy" in sft.get(name, {})
        and metrics["accuracy"] < sft[name]["accuracy"] - REGRESSION_POINTS
    }


def load_policy(model, adapter: Path) -> PeftModel:
    """The trainable policy: ``adapter`` on ``model``, with every dropout off.

    The cached reference log-probs come from the same adapter in eval mode; with LoRA dropout on
    during training the policy would score the same pair differently from its reference, and
    the implicit reward and margin would not be 0 at step 0 (TRL turns dropout off for DPO by
    default for the same reason). The adapter config keeps its ``lora_dropout`` for SFT.
    """
    policy = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    disabled = disable_dropout(policy)
    if disabled:
        log.info("dpo: dropout off in %d modules (policy and reference score alike)", disabled)
    return policy


def build_pairs(model, tokenizer, tasks, cfg: RunConfig) -> dict[str, list]:
    """Training and held-out pairs from ``dpo.dataset`` and/or the tasks ``dpo.tasks`` names."""
    pairs: dict[str, list] = {"train": [], "validation": []}
    if cfg.dpo.dataset:
        for split, found in preference.dataset_pairs(cfg).items():
            pairs[split] += found
    chosen_tasks = preference.preference_tasks(cfg, tasks)
    if chosen_tasks:
        for split, found in preference.task_pairs(model, tokenizer, chosen_tasks, cfg).items():
            pairs[split] += found
    if not pairs["train"]:
        raise ValueError(
            "the DPO stage has no preference pairs: set dpo.dataset, or add a classification "
            "or multiple_choice task (dpo.tasks)"
        )
    log.info(
        "dpo pairs: %d train, %d held out (negatives: %s)",
        len(pairs["train"]),
        len(pairs["validation"]),
        cfg.dpo.negatives,
    )
    return pairs


def broadcast_from_rank_zero(ctx: DistContext, value):
    """Rank 0's ``value`` on every rank (any picklable object); itself in one process."""
    if not ctx.initialized:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def adapter_fingerprint(adapter: Path) -> str:
    """sha256 over the adapter folder's adapter_* files (weights and config)."""
    digest = hashlib.sha256()
    for path in sorted(adapter.glob("adapter_*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            digest.update(json.dumps([side.input_ids, side.labels]).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logprobs(
    model, pairs: list[TokenizedPair], pad_id: int, batch_size: int, ctx: DistContext | None = None
) -> torch.Tensor:
    """[pairs, 2] summed answer log-probs (chosen, rejected) of the model as it is now.

    Eval mode (no LoRA dropout), adapter enabled: the starting policy itself is the reference.
    Under torchrun rank r scores the length-sorted batches r, r + world, ... (the batches of one
    process, so the same padding and the same figures), every rank running as many forwards
    (a rank out of batches repeats the first and drops the result); the table is summed over ranks.
    """
    ctx = one_process_or(ctx)
    device = next(model.parameters()).device
    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        batches, score = reference_batches(model, pairs, pad_id, batch_size)
        rounds = -(-len(batches) // ctx.world_size)
        for number in range(rounds * ctx.world_size)[ctx.rank :: ctx.world_size]:
            if number >= len(batches):
                score(batches[0])  # in step with the other ranks
                continue
            for (index, side), value in score(batches[number]):
                out[index, side] = value
    finally:
        model.train(was_training)
    return sum_over_ranks(ctx, out).cpu()


def reference_batches(model, pairs: list[TokenizedPair], pad_id: int, batch_size: int):
    """Length-sorted batches of ``batch_size`` sequences, and the function scoring one batch
    into ((pair index, side), log-prob) items.

    Pairs with a shared prompt are scored whole, prompt once (``pair_logprobs``), as training
    scores them; otherwise each side is a sequence of its own.
    """
    if any(p.shared_prompt for p in pairs):
        ordered = sorted(
            pairs, key=lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids), reverse=True
        )
        per_batch = max(1, batch_size // 2)
        batches = [ordered[i : i + per_batch] for i in range(0, len(ordered), per_batch)]

        def score_pairs(batch):
            values = pair_logprobs(model, batch, pad_id).float()
            keys = [(p.index, 0) for p in batch] + [(p.index, 1) for p in batch]
            return list(zip(keys, values))

        return batches, score_pairs
    sides = [(p.index, 0, p.chosen) for p in pairs] + [(p.index, 1, p.rejected) for p in pairs]
    # task_index/example_index carry (side, pair) through the length-sorted batches.
    examples = [
        dataclasses.replace(example, task_index=side, example_index=index)
        for index, side, example in sides
    ]

    def score_sides(batch):
        values = sequence_logprobs(model, batch, pad_id).float()
        return [((e.example_index, e.task_index), v) for e, v in zip(batch, values)]

    return list(by_length(examples, batch_size)), score_sides


def reference_logprobs(
    model,
    pairs: list[TokenizedPair],
    pad_id: int,
    batch_size: int,
    cache: Path,
    adapter: Path,
    ctx: DistContext | None = None,
) -> torch.Tensor:
    """The cached reference table when its fingerprint matches (on every rank), else computed
    and cached (written by rank 0)."""
    ctx = one_process_or(ctx)
    fingerprint = {"pairs": pairs_fingerprint(pairs), "adapter": adapter_fingerprint(adapter)}
    saved = torch.load(cache, weights_only=True) if cache.is_file() else {}
    reusable = saved.get("fingerprint") == fingerprint
    # One rank without the file (another node's disk) makes every rank compute: they must
    # run the same forwards.
    if not any_rank(ctx, not reusable)[0]:
        log.info("reference log-probs: reusing %s (same pairs and starting adapter)", cache)
        return saved["logprobs"]
    if saved:
        log.info(
            "reference log-probs: %s is for other pairs or another adapter; recomputing", cache
        )
    logprobs = compute_reference_logprobs(model, pairs, pad_id, batch_size, ctx)
    if ctx.is_main:
        partial = cache.with_suffix(".tmp")
        torch.save({"fingerprint": fingerprint, "logprobs": logprobs}, partial)
        partial.replace(cache)  # atomic: a crash never leaves a half-written table behind
        log.info("reference log-probs: computed for %d pairs, cached in %s", len(pairs), cache)
    return logprobs


@torch.no_grad()
def preference_accuracy(
    model, pairs: list[TokenizedPair], pad_id: int, batch_size: int, ctx: DistContext | None = None
) -> float | None:
    """Share of pairs where the model gives the chosen answer the higher log-prob."""
    if not pairs:
        return None
    scores = compute_reference_logprobs(model, pairs, pad_id, batch_size, ctx)
    return float((scores[:, 0] > scores[:, 1]).float().mean())


def starting_results(model, tokenizer, tasks, cfg: RunConfig, adapter: Path) -> dict:
    """`multitune dpo` alone: evaluate the starting adapter (and the base) for the table."""
    results = {"adapter": str(adapter)}
    if cfg.eval.before_training:
        with adapters_disabled(model):
            results["base"] = {"tasks": evaluate_tasks(model, tokenizer, tasks, cfg)}
    results["tasks"] = evaluate_tasks(model, tokenizer, tasks, cfg)
    return results


def dpo_training_data(
    pairs: list[TokenizedPair],
    reference: torch.Tensor,
    cfg: RunConfig,
    pad_id,
    device,
    fixed,
    ctx: DistContext | None = None,
) -> TrainingData:
    ctx = one_process_or(ctx, device)

    def epoch_items(epoch: int) -> list:
        order = list(range(len(pairs)))
        random.Random(f"{cfg.seed}-dpo-{epoch}").shuffle(order)
        return [pairs[i] for i in order]

    def window_step(model, micro_batches):
        # Every rank divides by the pairs (and chosen tokens) of the whole global batch.
        window = global_window_counts(ctx, micro_batches) if ctx.initialized else None
        result = dpo_window_step(model, micro_batches, reference, cfg.dpo, pad_id, window)
        return sum_preference_results(ctx, result)

    return TrainingData(
        len(pairs),
        epoch_items,
        list,
        window_step,
        lambda: PreferenceLogWindow(device),
        fixed,
        filler=FillerPairs,
    )


def global_window_counts(ctx: DistContext, micro_batches: list[list]) -> tuple[int, int]:
    """(pairs, chosen answer tokens) of the whole global batch, over all ranks."""
    counted = [mb for mb in micro_batches if not isinstance(mb, FillerPairs)]
    local = [
        sum(len(mb) for mb in counted),
        sum(p.chosen.num_answer_tokens for mb in counted for p in mb),
    ]
    pairs, tokens = sum_over_ranks(ctx, torch.tensor(local, device=ctx.device)).tolist()
    return int(pairs), int(tokens)


def sum_preference_results(ctx: DistContext, result: DpoStepResult) -> DpoStepResult:
    """The step's figures over the whole global batch (one all-reduce; each rank's ``loss`` is
    already its share of the global mean, so the sum over ranks is the global loss)."""
    if not ctx.initialized:
        return result
    fields = ("loss", "chosen_reward_sum", "rejected_reward_sum", "correct", "chosen_nll_sum")
    counts = ("num_pairs", "num_input_tokens", "num_chosen_tokens")
    device = result.loss.device
    packed = torch.stack(
        [getattr(result, f).detach().float().reshape(()) for f in fields]
        + [torch.tensor(float(getattr(result, c)), device=device) for c in counts]
    )
    total = sum_over_ranks(ctx, packed)
    summed = dict(zip(fields, total[: len(fields)]))
    summed.update({c: int(v) for c, v in zip(counts, total[len(fields) :].tolist())})
    return DpoStepResult(**summed)


class PreferenceLogWindow:
    """DPO figures summed on device between log events (the SFT window's counterpart)."""

    def __init__(self, device) -> None:
        self.device = device
        self.last_tokens_per_s = 0.0
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.loss_sum, self.chosen, self.rejected, self.correct = zero, zero, zero, zero
        self.nll, self.grad_norm_sum = zero, zero
        self.pairs = self.chosen_tokens = self.input_tokens = self.steps = 0
        self.started = time.perf_counter()

    def add(self, result, grad_norm) -> None:
        self.loss_sum = self.loss_sum + result.loss
        self.chosen = self.chosen + result.chosen_reward_sum
        self.rejected = self.rejected + result.rejected_reward_sum
        self.correct = self.correct + result.correct
        self.nll = self.nll + result.chosen_nll_sum
        self.grad_norm_sum = self.grad_norm_sum + grad_norm.detach()
        self.pairs += result.num_pairs
        self.chosen_tokens += result.num_chosen_tokens
        self.input_tokens += result.num_input_tokens
        self.steps += 1

    def flush(self, step: int, epoch: float, lr: float, tasks) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.last_tokens_per_s = self.input_tokens / elapsed
        chosen, rejected = self.chosen / self.pairs, self.rejected / self.pairs
        means = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "rewards/accuracy": self.correct / self.pairs,
        }
        record = {
            "step": step,
            "epoch": round(epoch, 4),
            "split": "train",
            "stage": "dpo",
            "loss": (self.loss_sum / self.steps).item(),
            "lr": lr,
            "grad_norm": (self.grad_norm_sum / self.steps).item(),
            "tokens_per_s": self.last_tokens_per_s,
            **{key: value.item() for key, value in means.items()},
            "chosen_nll": (self.nll / self.chosen_tokens).item(),
        }
        self._reset()
        return record

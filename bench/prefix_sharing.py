"""Training step time with data.share_prefix on and off, on the demo's model and data.

Builds the demo (configs/demo.yaml unless ``--config``: SmolLM2-135M-Instruct, its LoRA config,
untrained) and times ``accumulate_gradients`` over the same optimizer steps (the first epoch's
mixed order, ``train.micro_batch_size`` x ``train.grad_accum`` examples each) laid out twice:
unshared (packed or padded per ``data.packing``) and with each task's shared prefix computed
once per micro-batch. Each layout runs ``--warmup`` untimed steps, then the two alternate over
``--steps`` timed steps; it prints the tokens each computes, the median seconds per step and the
throughput in the tokens the examples stand for (every example's full length, on both sides).
``--dpo``: the same for DPO window steps (``dpo.train`` micro-batches) on pairs of the tasks with
a random wrong answer as the rejected one, each pair's prompt shared or not; pairs/s.
``--mining``: DPO's negative mining (scoring every candidate answer of ``--questions`` training
questions per task), one question per forward (its prompt once) against ``eval.batch_size``
questions per forward (their common start once too); questions/s.

The last line reads ``share_prefix: throughput ratio R.RRx`` (shared over unshared).

Run: .venv/bin/python bench/prefix_sharing.py [--dpo | --mining] [--device cuda] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per layout")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per layout first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dpo", action="store_true", help="time DPO window steps instead")
    parser.add_argument("--mining", action="store_true", help="time DPO negative mining instead")
    parser.add_argument("--questions", type=int, default=48, help="--mining: questions per task")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for train")
    args = parser.parse_args()

    import torch

    from multitune.config.loader import load_config
    from multitune.data.mixing import epoch_order, task_probabilities
    from multitune.data.packing import micro_batches
    from multitune.data.pipeline import (
        choose_prefix_sharing,
        load_tasks,
        tokenize_tasks,
        training_corpus,
    )
    from multitune.data.prefix_sharing import row_width_scale
    from multitune.models.loading import load_model_and_tokenizer, resolve_attn_implementation
    from multitune.recipes.sft import prepare_for_training
    from multitune.training.state import seed_everything
    from multitune.training.step import accumulate_gradients, count_input_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.overrides, "data.share_prefix=true"])
    device = torch.device(args.device)
    seed_everything(cfg.seed)
    tasks = load_tasks(cfg, include_test=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model, training_corpus(tasks), cfg.seed, device)
    tokenize_tasks(tasks, tokenizer, cfg)
    shared = choose_prefix_sharing(tasks, cfg, resolve_attn_implementation(cfg.model, device))
    model = prepare_for_training(model, cfg).to(device)

    if args.dpo:
        return time_dpo(model, tokenizer, tasks, cfg, device, args)
    if args.mining:
        return time_mining(model, tokenizer, tasks, cfg, args)
    sizes = [len(t.tokenized["train"]) for t in tasks]
    weights = [t.sampling_weight for t in cfg.tasks]
    order = epoch_order(sizes, task_probabilities(sizes, cfg.data, weights), cfg.seed, 0)
    micro, per_step = cfg.train.micro_batch_size, cfg.train.micro_batch_size * cfg.train.grad_accum
    steps = [order[i : i + per_step] for i in range(0, len(order), per_step)]
    steps = steps[: args.warmup + args.steps]
    loss_weights = torch.ones(len(tasks), device=device)
    pad = tokenizer.pad_token_id

    def windows(prefix_lengths):
        return [
            micro_batches(
                [tasks[t].tokenized["train"][i] for t, i in ids],
                micro,
                pad,
                cfg.data,
                cfg.seed,
                prefix_lengths,
                row_width_scale(model.config),
            )
            for ids in steps
        ]

    layouts = {"unshared": windows(()), "shared": windows(shared)}
    times = {name: [] for name in layouts}
    for number in range(len(steps)):
        for name, batches in layouts.items():
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            accumulate_gradients(model, batches[number], loss_weights, len(tasks))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if number >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"shared prefixes: {dict(zip((t.spec.name for t in tasks), shared))}")
    example_tokens = sum(
        len(tasks[t].tokenized["train"][i].input_ids)
        for ids in steps[args.warmup :]
        for t, i in ids
    )
    rates = {}
    for name, batches in layouts.items():
        tokens = sum(count_input_tokens(mb) for window in batches for mb in window)
        rates[name] = example_tokens / sum(times[name])
        print(
            f"{name:9s} {tokens:9,d} tokens computed  {statistics.median(times[name]):.3f} s/step "
            f"(median)  {rates[name]:7.0f} example tokens/s"
        )
    print(f"share_prefix: throughput ratio {rates['shared'] / rates['unshared']:.2f}x")


def time_dpo(model, tokenizer, tasks, cfg, device, args) -> None:
    """DPO window steps over the same pairs with each pair's prompt shared and not: pairs/s."""
    import torch

    from multitune.data import preference
    from multitune.models.loading import resolve_attn_implementation
    from multitune.training.dpo_step import dpo_window_step, share_pair_prompts

    cfg = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"negatives": "random"})})
    pairs, _ = preference.tokenize_pairs(
        preference.task_pairs(model, tokenizer, tasks, cfg)["train"], tokenizer, cfg
    )
    attn = resolve_attn_implementation(cfg.model, device)
    layouts = {
        "unshared": share_pair_prompts(pairs, False, attn),
        "shared": share_pair_prompts(pairs, True, attn),
    }
    micro, per_step = (
        cfg.dpo.train.micro_batch_size,
        cfg.dpo.train.micro_batch_size * cfg.dpo.train.grad_accum,
    )
    reference = torch.zeros(len(pairs), 2, device=device)  # the step's cost does not depend on it
    pad = tokenizer.pad_token_id
    times = {name: [] for name in layouts}
    for number in range(args.warmup + args.steps):
        for name, layout in layouts.items():
            window = layout[number * per_step : (number + 1) * per_step]
            micro_batches = [window[i : i + micro] for i in range(0, len(window), micro)]
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            dpo_window_step(model, micro_batches, reference, cfg.dpo, pad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if number >= args.warmup:
                times[name].append(time.perf_counter() - start)
    shared = [p.shared_prompt for p in layouts["shared"]]
    print(f"DPO pairs: {len(pairs)}, mean shared prompt tokens {sum(shared) / len(shared):.1f}")
    rates = {}
    for name in layouts:
        rates[name] = args.steps * per_step / sum(times[name])
        print(
            f"{name:9s} {statistics.median(times[name]):.3f} s/step (median)  "
            f"{rates[name]:6.2f} pairs/s"
        )
    print(f"share_prefix: throughput ratio {rates['shared'] / rates['unshared']:.2f}x")


def time_mining(model, tokenizer, tasks, cfg, args) -> None:
    """DPO mining with one question per forward and with ``eval.batch_size``: questions/s."""
    from multitune.data.preference import candidate_logprobs

    one = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 1})})
    layouts = {"per question": one, f"{cfg.eval.batch_size} per forward": cfg}
    questions = [t.examples["train"][: args.questions] for t in tasks]
    candidate_logprobs(model, tokenizer, questions[0][:2], cfg)  # warm-up
    seconds = dict.fromkeys(layouts, 0.0)
    for task, examples in zip(tasks, questions):
        scores = {}
        for name, config in layouts.items():
            start = time.perf_counter()
            scores[name] = candidate_logprobs(model, tokenizer, examples, config)
            seconds[name] += time.perf_counter() - start
        first, second = scores.values()
        diff = max(abs(a - b) for x, y in zip(first, second) for a, b in zip(x, y))
        print(f"{task.spec.name:16s} {len(examples)} questions, scores within {diff:.1e}")
    total = sum(len(q) for q in questions)
    for name in layouts:
        print(f"{name:16s} {seconds[name]:7.1f} s  {total / seconds[name]:6.2f} questions/s")
    first, second = seconds.values()
    print(f"share_prefix: throughput ratio {first / second:.2f}x")


if __name__ == "__main__":
    main()

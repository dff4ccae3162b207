"""Training step time with data.share_prefix on and off, on the demo's model and data.

Builds the demo (configs/demo.yaml unless ``--config``: SmolLM2-135M-Instruct, its LoRA config,
untrained) and times ``accumulate_gradients`` over the same optimizer steps (the first epoch's
mixed order, ``train.micro_batch_size`` x ``train.grad_accum`` examples each) laid out twice:
unshared (packed or padded per ``data.packing``) and with each task's shared prefix computed
once per micro-batch. Each layout runs ``--warmup`` untimed steps, then the two alternate over
``--steps`` timed steps; it prints the tokens each computes and the median seconds per step.

Run: .venv/bin/python bench/prefix_sharing.py [--device cuda] [--steps 20] [--threads 2]
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
    for name, batches in layouts.items():
        tokens = sum(count_input_tokens(mb) for window in batches for mb in window)
        median = statistics.median(times[name]) if times[name] else float("nan")
        print(f"{name:9s} {tokens:9,d} tokens computed  {median:.3f} s/step (median)")


if __name__ == "__main__":
    main()

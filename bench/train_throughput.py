"""Training throughput: the plain stack against multitune's packing + fused loss, side by side.

What it isolates: the output head. By default the model is a head-dominated toy (the 4-layer,
128-hidden tiny model with Llama 3.2's 128256-entry vocabulary), where projecting every position
onto the vocabulary is nearly all of the plain side's work and memory, so the ratios it prints
are an upper bound of what the fused loss gives, not what a user of a real model sees. For a
real model's shape pass ``--model /path/to/folder`` (e.g. SmolLM2-135M-Instruct) or
``--model llama-3.2-1b-shape``; for the comparison with a real trainer see bench/peer_trl.py.

Both sides train the same model, data, LoRA and global batch, each in its own process:
- plain: per-batch padding to the longest row, the Hugging Face model forward with ``labels``
  (full-vocabulary float32 logits for every position, then the usual cross-entropy);
- multitune: ``data.packing`` rows of ``--max-seq-len`` and the decoder-only step whose loss
  projects only answer positions inside the fused C++ op (``training.step``).
Data: the three-task demo mix (``configs/demo.yaml``: banking77, commonsense_qa, text_claims
samples) in the seeded epoch order a run uses. LoRA: the demo's adapters (r 16 on every
projection) with a frozen embedding/lm_head, as for a real model (``--train-embeddings``
trains the tied embedding too, as the demo does). Useful tokens are non-pad input tokens.

Memory: peak RSS of the process during training (VmHWM reset after setup; the model, data and
interpreter included), and on CUDA the peak allocated bytes. The last line reads
``throughput ratio R.RRx, peak memory ratio M.MMx`` (multitune over plain; memory below 1 is
better).

Run on CPU (the default: micro tiny model at vocabulary 128256):
    OMP_NUM_THREADS=1 .venv/bin/python bench/train_throughput.py --threads 1
On a GPU see bench/gpu.sh (the Llama-3.2-1B shape, seq 2048, bf16, with MFU).

MFU (``--peak-tflops``) counts the FLOPs a LoRA step needs per useful token: the frozen linear
layers forward plus activation gradients (4 x their parameters; LoRA's own weight gradients are
negligible at rank 16), attention scores and values forward and backward (12 x layers x hidden x
the mean causal context of an example), and the vocabulary projection for answer tokens only
(4 x hidden x vocab each). Both sides are credited the same useful FLOPs, so the plain stack's
extra work (padding, projecting every position) shows as a lower MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peak_rss import peak_rss, reset_peak_rss  # bench/peak_rss.py, beside this script

REPO = Path(__file__).resolve().parents[1]
TOY_MODELS = ("tiny", "llama-3.2-1b-shape")  # else --model is a model.name (folder, hub id)
LLAMA_32_1B_SHAPE = {  # meta-llama/Llama-3.2-1B config.json, without downloading anything
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}


def setup(args):
    """Config, tasks, tokenizer, model with LoRA and the steps' examples (same for both sides)."""
    import torch

    from multitune.config.loader import load_config
    from multitune.data.mixing import epoch_order, task_probabilities
    from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
    from multitune.models.loading import load_model_and_tokenizer
    from multitune.models.lora import apply_lora

    overrides = [
        f"model.tiny.size={args.size}",
        f"model.tiny.vocab_size={args.vocab}",
        f"model.name={args.model if args.model not in TOY_MODELS else 'builtin:tiny-llama'}",
        f"data.max_seq_len={args.max_seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.grad_accum={args.grad_accum}",
        f"model.dtype={args.dtype}",
    ]
    if not args.train_embeddings:
        overrides.append("lora.modules_to_save=[]")
    if args.attn:
        overrides.append(f"model.attn_implementation={args.attn}")
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    device = torch.device(args.device)
    tasks = load_tasks(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, training_corpus(tasks), 0, device)
    if args.model == "llama-3.2-1b-shape":
        model = build_llama_shape(cfg, tokenizer, device)
    tokenize_tasks(tasks, tokenizer, cfg)
    model = apply_lora(model, cfg.lora)
    model.train()
    sizes = [len(t.tokenized["train"]) for t in tasks]
    probabilities = task_probabilities(sizes, cfg.data, [t.sampling_weight for t in cfg.tasks])
    order = epoch_order(sizes, probabilities, cfg.seed, 0)
    global_batch = args.micro_batch * args.grad_accum
    needed = (args.warmup + args.steps) * global_batch
    order = (order * (needed // len(order) + 1))[:needed]
    examples = [tasks[t].tokenized["train"][i] for t, i in order]
    steps = [examples[i : i + global_batch] for i in range(0, needed, global_batch)]
    return cfg, model, tokenizer, steps, device


def build_llama_shape(cfg, tokenizer, device, layers: int | None = None):
    """A randomly initialised Llama-3.2-1B-shaped model (weights never downloaded); ``layers``
    keeps only that many decoder layers (dry runs on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from multitune.models.loading import resolve_attn_implementation, resolve_dtype

    shape = dict(LLAMA_32_1B_SHAPE)
    if layers:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # built in its dtype: no float32 copy on the way
        model = LlamaForCausalLM._from_config(
            config,
            dtype=resolve_dtype(cfg.model, device),
            attn_implementation=resolve_attn_implementation(cfg.model, device),
        )
    return model


def useful_flops(model, examples) -> float:
    """LoRA step FLOPs for these examples (see the module docstring)."""
    config = model.config
    frozen = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "lora_" not in n and "embed_tokens" not in n and "lm_head" not in n
    )
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    total = 0.0
    for e in examples:
        n = len(e.input_ids)
        mean_context = (n + 1) / 2
        total += n * (4 * frozen + 12 * layers * hidden * mean_context)
        total += e.num_answer_tokens * 4 * hidden * vocab
    return total


def plain_step(model, optimizer, step_examples, micro_batch, pad_id, device) -> None:
    """The usual loop: pad per batch, HF forward with labels (full fp32 logits), mean CE."""
    from multitune.data.batching import collate

    micro = [step_examples[i : i + micro_batch] for i in range(0, len(step_examples), micro_batch)]
    for batch in micro:
        tensors = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
        out = model(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            labels=tensors["labels"],
            use_cache=False,
        )
        (out.loss / len(micro)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def multitune_step(model, optimizer, step_examples, cfg, pad_id, weights) -> None:
    """Our step: packed micro-batches, decoder only, fused loss on answer positions."""
    from multitune.data.packing import micro_batches
    from multitune.training.step import accumulate_gradients

    batches = micro_batches(step_examples, cfg.train.micro_batch_size, pad_id, cfg.data, cfg.seed)
    accumulate_gradients(model, batches, weights, len(weights))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(args) -> dict:
    """Runs in the child process: one side, warmup steps, then timed steps."""
    import gc

    import torch

    from multitune import ops
    from multitune.training.schedule import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, tokenizer, steps, device = setup(args)
    optimizer = build_optimizer(model, cfg.train)
    pad_id = tokenizer.pad_token_id
    weights = torch.ones(len(cfg.tasks), device=device)
    backend = ops.active_backend() if args.side == "multitune" else "-"

    def run_step(step_examples):
        if args.side == "plain":
            plain_step(model, optimizer, step_examples, args.micro_batch, pad_id, device)
        else:
            multitune_step(model, optimizer, step_examples, cfg, pad_id, weights)

    for step_examples in steps[: args.warmup]:
        run_step(step_examples)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = reset_peak_rss()
    timed = steps[args.warmup :]
    started = time.perf_counter()
    for step_examples in timed:
        run_step(step_examples)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    examples = [e for step in timed for e in step]
    tokens = sum(len(e.input_ids) for e in examples)
    return {
        "side": args.side,
        "backend": backend,
        "steps": len(timed),
        "seconds": seconds,
        "useful_tokens": tokens,
        "answer_tokens": sum(e.num_answer_tokens for e in examples),
        "tokens_per_s": tokens / seconds,
        "peak_rss": peak_rss(),
        "rss_before": rss_before,
        "peak_cuda": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "flops": useful_flops(model, examples),
    }


def run_side(side: str, argv: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = subprocess.run(
        [sys.executable, __file__, *argv, "--side", side],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["plain", "multitune"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (head-dominated toy), llama-3.2-1b-shape (random weights), or a model.name",
    )
    parser.add_argument("--size", default="micro", help="tiny model size (nano/micro/small)")
    parser.add_argument("--vocab", type=int, default=128256, help="padded vocabulary")
    parser.add_argument("--max-seq-len", type=int, default=256, help="packed row length")
    parser.add_argument("--micro-batch", type=int, default=16, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="model.dtype (auto: bf16 on GPU)")
    parser.add_argument("--attn", default=None, help="model.attn_implementation")
    parser.add_argument("--train-embeddings", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (H200: 989)")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args)))
        return

    argv = [a for a in sys.argv[1:]]
    started = time.perf_counter()
    results = {side: run_side(side, argv) for side in ("plain", "multitune")}
    mib = 1024**2
    if args.model == "tiny":
        print(
            "NOTE: a head-dominated toy (4 small layers, vocabulary 128256): these ratios isolate "
            "the output head and overstate what a real model gains; see --model and peer_trl.py"
        )
    described = {"tiny": f"tiny {args.size}, vocab {args.vocab}", "llama-3.2-1b-shape": "1B shape"}
    print(
        f"model {args.model} ({described.get(args.model, 'its own shape')}), device "
        f"{args.device}, micro-batch {args.micro_batch} x accum {args.grad_accum}, packed rows "
        f"of {args.max_seq_len}, {results['plain']['steps']} timed steps after {args.warmup} "
        f"warmup, threads {args.threads or 'default'}"
    )
    header = f"{'side':<10} {'useful tok/s':>12} {'peak RSS MiB':>12} {'RSS growth MiB':>14}"
    if args.device != "cpu":
        header += f" {'peak alloc MiB':>14}"
    if args.peak_tflops:
        header += f" {'MFU':>6}"
    print(header + "  ops")
    for side, r in results.items():
        line = (
            f"{side:<10} {r['tokens_per_s']:>12.0f} {r['peak_rss'] / mib:>12.0f} "
            f"{(r['peak_rss'] - r['rss_before']) / mib:>14.0f}"
        )
        if args.device != "cpu":
            line += f" {r['peak_cuda'] / mib:>14.0f}"
        if args.peak_tflops:
            mfu = r["flops"] / r["seconds"] / (args.peak_tflops * 1e12)
            line += f" {mfu:>6.1%}"
        print(line + f"  {r['backend']}")
    plain, ours = results["plain"], results["multitune"]
    memory_key = "peak_cuda" if args.device != "cpu" else "peak_rss"
    load = os.getloadavg()[0]
    print(
        f"ran in {time.perf_counter() - started:.0f} s; load average {load:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"throughput ratio {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x, "
        f"peak memory ratio {ours[memory_key] / plain[memory_key]:.2f}x"
    )


if __name__ == "__main__":
    main()

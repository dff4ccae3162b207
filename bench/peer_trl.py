"""multitune against TRL's SFTTrainer + peft: same model, data, LoRA, batch, lr and steps.

Each side runs in its own process, one after the other, and trains the same examples in the
same order: the first ``steps x micro-batch`` examples of a multitune run's seeded epoch order
over the three-task sample mix (``configs/demo.yaml``: banking77, commonsense_qa, text_claims).
Both sides load the model and tokenizer through multitune's loader (so the built-in models,
model folders and the tiny tokenizer are the same objects on both sides) and render the chat
with the tokenizer's own template; the loss is on the answer only on both sides.

- TRL: ``SFTTrainer`` (defaults: padded batches, its ``chunked_nll`` loss) on prompt/completion
  conversations (the prompt = every message but the last, the completion = the assistant
  answer), ``peft_config`` with the same LoRA, sequential sampling, no saving or evaluation.
- multitune: the SFT recipe's own ``train_loop`` (packing when ``data.packing``, each task's
  shared prompt prefix once per micro-batch as ``data.share_prefix`` (auto) picks it, the fused
  ``linear_cross_entropy`` loss), no evaluation; it commits one adapter checkpoint at the end,
  as a run does.

Useful tokens are non-pad input tokens (TRL: the attention mask of its batches; multitune: the
examples' lengths). Memory: peak RSS of the whole process on CPU (VmHWM, model loading
included, ``bench/peak_rss.py``), max allocated bytes on CUDA. The last line reads exactly
``vs TRL: throughput ratio R.RRx, peak memory ratio M.MMx`` (multitune over TRL; memory below 1
is better).

    OMP_NUM_THREADS=1 .venv/bin/python bench/peer_trl.py --threads 1            # SmolLM2, CPU
    .venv/bin/python bench/peer_trl.py --gradient-checkpointing --threads 1     # both sides
    .venv/bin/python bench/peer_trl.py --model /path/folder-or.gguf
    .venv/bin/python bench/peer_trl.py --model llama-3.2-1b-shape --device cuda  # see gpu.sh

A GGUF file is converted once (dequantised to float32) into a model folder beside this
process's cache (``--cache``), which both sides then load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import peak_rss  # bench/peak_rss.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
RATIO_LINE = "vs TRL: throughput ratio {throughput:.2f}x, peak memory ratio {memory:.2f}x"


def run_config(args, output_dir: str):
    """The run config both sides read their settings from."""
    from multitune.config.loader import load_config

    name = "builtin:tiny-llama" if args.model == "llama-3.2-1b-shape" else args.model
    overrides = [
        f"output_dir={output_dir}",
        f"model.name={name}",
        f"model.dtype={args.dtype}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "lora.modules_to_save=[]",  # adapters only, on every projection (the default targets)
        f"data.max_seq_len={args.max_seq_len}",
        f"data.packing={str(not args.no_packing).lower()}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum=1",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        "train.progress_bar=false",
        f"train.log_every_steps={args.steps}",
        "eval.before_training=false",
    ]
    if args.model == "builtin:tiny-llama" or args.model == "llama-3.2-1b-shape":
        overrides.append(f"model.tiny.size={args.tiny_size}")
    if args.attn:
        overrides.append(f"model.attn_implementation={args.attn}")
    if args.max_examples:
        overrides += [f"tasks.{i}.max_examples={args.max_examples}" for i in range(3)]
    return load_config(REPO / "configs" / "demo.yaml", overrides)


def setup(args, output_dir: str):
    """Config, tasks (tokenized), model, tokenizer and the ordered (task, example) pairs."""
    import torch

    from multitune.data.mixing import epoch_order, task_probabilities
    from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
    from multitune.models.loading import load_model_and_tokenizer

    cfg = run_config(args, output_dir)
    device = torch.device(args.device)
    tasks = load_tasks(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, training_corpus(tasks), cfg.seed, device)
    if args.model == "llama-3.2-1b-shape":
        from train_throughput import build_llama_shape

        model = build_llama_shape(cfg, tokenizer, device, args.shape_layers)
    tokenize_tasks(tasks, tokenizer, cfg)
    sizes = [len(t.tokenized["train"]) for t in tasks]
    probabilities = task_probabilities(sizes, cfg.data, [t.sampling_weight for t in cfg.tasks])
    order = epoch_order(sizes, probabilities, cfg.seed, 0)[: args.steps * args.micro_batch]
    if len(order) < args.steps * args.micro_batch:
        raise SystemExit("fewer training examples than steps x micro-batch; lower --steps")
    return cfg, tasks, model, tokenizer, order, device


def train_trl(args, cfg, tasks, model, tokenizer, order, device) -> dict:
    """TRL's SFTTrainer on prompt/completion conversations of the same examples, in order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = []
    for t, i in order:
        tokenized = tasks[t].tokenized["train"][i]
        messages = list(tasks[t].examples["train"][tokenized.example_index].messages)
        assert messages[-1]["role"] == "assistant"
        rows.append(
            {
                "prompt": messages[:-1],
                "completion": messages[-1:],
                "chat_template_kwargs": {"date_string": cfg.data.template_date},
            }
        )
    cuda = device.type == "cuda"
    training_args = SFTConfig(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # below 1: a fraction of the steps
        weight_decay=cfg.train.weight_decay,
        adam_beta1=cfg.train.adam_betas[0],
        adam_beta2=cfg.train.adam_betas[1],
        max_grad_norm=cfg.train.max_grad_norm or 0.0,
        optim="adamw_torch",
        max_length=cfg.data.max_seq_len,
        completion_only_loss=True,
        gradient_checkpointing=args.gradient_checkpointing,
        train_sampling_strategy="sequential",
        bf16=cuda and cfg.model.dtype in ("auto", "bfloat16"),
        use_cpu=not cuda,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    seen = {"examples": 0, "tokens": 0}
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        seen["examples"] += len(examples)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting_collator
    _start_measuring(device)
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    counted = {"examples": seen["examples"], "tokens": seen["tokens"], "seconds": seconds}
    return counted, trainer.model


def train_multitune(args, cfg, tasks, model, tokenizer, order, device) -> dict:
    """The SFT recipe's loop over the same examples (``train.max_steps`` stops it)."""
    import dataclasses

    import torch

    from multitune.data.pipeline import choose_prefix_sharing
    from multitune.distributed.process_group import DistContext
    from multitune.models.loading import resolve_attn_implementation
    from multitune.recipes.sft import prepare_for_training, sft_training_data
    from multitune.training.loop import train_loop

    # As the SFT recipe does after tokenizing: data.share_prefix (auto) picks the prefixes a
    # micro-batch computes once.
    choose_prefix_sharing(tasks, cfg, resolve_attn_implementation(cfg.model, device))
    model = prepare_for_training(model, cfg)
    ctx = DistContext(device=device)
    data = sft_training_data(model, tokenizer, tasks, cfg, device, ctx)
    seen = {"examples": 0, "tokens": 0}
    collate = data.collate

    def counting_collate(ids):
        for t, i in ids:
            seen["tokens"] += len(tasks[t].tokenized["train"][i].input_ids)
        seen["examples"] += len(ids)
        return collate(ids)

    data = dataclasses.replace(data, collate=counting_collate)
    assert data.epoch_items(0)[: len(order)] == order
    _start_measuring(device)
    started = time.perf_counter()
    train_loop(model, tokenizer, tasks, cfg, Path(cfg.output_dir), device, data=data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    counted = {"examples": seen["examples"], "tokens": seen["tokens"], "seconds": seconds}
    return counted, model


def _start_measuring(device) -> None:
    """Reset the CUDA peak before training (peak RSS counts from process start: loading
    included, as a user's run sees it)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measure(args) -> dict:
    """Runs in the child process: one side, from loading to the end of training."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"peer-{args.side}-") as output_dir:
        cfg, tasks, model, tokenizer, order, device = setup(args, output_dir)
        train = train_trl if args.side == "trl" else train_multitune
        result, trained = train(args, cfg, tasks, model, tokenizer, order, device)
    from train_throughput import useful_flops

    examples = [tasks[t].tokenized["train"][i] for t, i in order]
    return {
        **result,
        "side": args.side,
        "tokens_per_s": result["tokens"] / result["seconds"],
        "peak_rss": peak_rss(),
        "peak_cuda": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "flops": useful_flops(trained, examples),
    }


def resolve_model(model: str, cache: Path) -> str:
    """A GGUF file becomes a float32 model folder (converted once); anything else is kept."""
    if not model.endswith(".gguf"):
        return model
    gguf = Path(model).resolve()
    folder = cache / gguf.stem
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    loaded.hf_quantizer = None  # dequantised: save it as a plain float32 model
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    loaded.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_side(side: str, argv: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["trl", "multitune"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="multitune model.name (built-in, hub id or folder), a .gguf file, or "
        "llama-3.2-1b-shape (random weights from its config, tiny tokenizer)",
    )
    parser.add_argument("--tiny-size", default="micro", help="built-in tiny model size")
    parser.add_argument(
        "--shape-layers", type=int, default=None, help="llama-3.2-1b-shape with fewer layers"
    )
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "multitune-peer"))
    parser.add_argument("--micro-batch", type=int, default=8, help="examples per step")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--max-examples", type=int, default=None, help="per task (short runs)")
    parser.add_argument("--no-packing", action="store_true", help="multitune pads too")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both sides")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="model.dtype (auto: bf16 on GPU)")
    parser.add_argument("--attn", default=None, help="model.attn_implementation, both sides")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (H100: 989)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(measure(args)))
        return
    started = time.perf_counter()
    model = resolve_model(args.model, Path(args.cache))
    argv = [*sys.argv[1:], "--model", model]  # the last --model wins
    load = os.getloadavg()
    results = {side: run_side(side, argv) for side in ("trl", "multitune")}
    print(
        f"model {model}, device {args.device}, dtype {args.dtype}, micro-batch {args.micro_batch}, "
        f"{args.steps} steps, max_seq_len {args.max_seq_len}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'} (both sides), threads "
        f"{args.threads or 'default'}"
    )
    memory_key = "peak_cuda" if args.device != "cpu" else "peak_rss"
    memory_name = "peak alloc MiB" if args.device != "cpu" else "peak RSS MiB"
    mib = 1024**2
    header = f"{'side':<10} {'examples':>8} {'non-pad tokens':>14} {'seconds':>8} {'tok/s':>7}"
    header += f" {memory_name:>14}"
    if args.peak_tflops:
        header += f" {'MFU':>6}"
    print(header)
    for side, r in results.items():
        line = (
            f"{side:<10} {r['examples']:>8} {r['tokens']:>14} {r['seconds']:>8.1f} "
            f"{r['tokens_per_s']:>7.0f} {r[memory_key] / mib:>14.0f}"
        )
        if args.peak_tflops:
            line += f" {r['flops'] / r['seconds'] / (args.peak_tflops * 1e12):>6.1%}"
        print(line)
    print(
        f"ran in {time.perf_counter() - started:.0f} s; load average {load[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs"
    )
    ours, trl = results["multitune"], results["trl"]
    print(
        RATIO_LINE.format(
            throughput=ours["tokens_per_s"] / trl["tokens_per_s"],
            memory=ours[memory_key] / trl[memory_key],
        )
    )


if __name__ == "__main__":
    main()

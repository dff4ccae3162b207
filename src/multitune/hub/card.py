"""The model card (README.md) of a run: Hub metadata in YAML front matter, then a readable body.

``render_model_card`` is a pure function of what a run wrote (config.yaml, eval_results.json,
data_report.json); ``write_model_card`` reads those files and writes the card beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from multitune.models.gguf import BUILTIN_GGUF_MODELS

# Equal to multitune.models.tiny.TINY_MODEL_NAME (a test pins it); not imported from there so
# that writing a card does not import torch and transformers.
TINY_MODEL_NAME = "builtin:tiny-llama"

# Base-model name prefix -> the license id the Hub uses for it; first match wins.
BASE_MODEL_LICENSES = [
    ("meta-llama/Llama-3.3-", "llama3.3"),
    ("meta-llama/Llama-3.2-", "llama3.2"),
    ("meta-llama/Llama-3.1-", "llama3.1"),
    ("meta-llama/Meta-Llama-3.1-", "llama3.1"),
    ("meta-llama/Meta-Llama-3-", "llama3"),
    ("meta-llama/Llama-2-", "llama2"),
]

# Task kind -> the Hub task type a model-index result is filed under.
HUB_TASK_TYPES = {
    "classification": "text-classification",
    "multiple_choice": "multiple-choice",
    "chat": "text-generation",
    "qa": "text-generation",
}

# eval_results.json metric key -> (Hub metric type, display name); listed in card order.
METRICS = {
    "accuracy": ("accuracy", "accuracy"),
    "macro_f1": ("f1", "macro F1"),
    "mcc": ("matthews_correlation", "MCC"),
    "loss": ("loss", "answer-token loss"),
    "perplexity": ("perplexity", "perplexity"),
}
DATA_FILE_SUFFIXES = (".csv", ".parquet", ".json", ".jsonl")


def write_model_card(
    output_dir: Path,
    repo_id: str | None = None,
    *,
    dest: Path | None = None,
    merged: bool = False,
    license: str | None = None,
) -> Path:
    """Write the card of the run in ``output_dir`` to ``dest`` (default ``output_dir``)/README.md.

    ``merged`` describes a merged export (plain transformers weights) instead of the adapter.
    """
    output_dir = Path(output_dir)
    config = _read(output_dir / "config.yaml", yaml.safe_load)
    eval_results = _read(output_dir / "eval_results.json", json.loads)
    data_report = _read(output_dir / "data_report.json", json.loads)
    text = render_model_card(config, eval_results, data_report, repo_id, merged, license=license)
    path = Path(dest or output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _read(path: Path, parse) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a model card needs a finished `multitune train` output folder"
        )
    return parse(path.read_text()) or {}


def render_model_card(
    config: dict,
    eval_results: dict,
    data_report: dict,
    repo_id: str | None,
    merged: bool,
    *,
    license: str | None = None,
) -> str:
    """The card text: YAML front matter (Hub metadata) then the markdown body."""
    metadata = card_metadata(config, eval_results, repo_id, merged, license)
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)
    body = "\n\n".join(
        [
            _intro_section(config, repo_id, merged),
            _training_section(config, data_report),
            _results_section(eval_results),
            _usage_section(config, repo_id, merged),
        ]
    )
    return f"---\n{front}---\n\n{body}\n"


def card_metadata(
    config: dict, eval_results: dict, repo_id: str | None, merged: bool, license: str | None
) -> dict[str, Any]:
    model_name = config["model"]["name"]
    tasks = config["tasks"]
    metadata: dict[str, Any] = {}
    builtin = BUILTIN_GGUF_MODELS.get(model_name)
    if model_name != TINY_MODEL_NAME:
        # The built-in tiny model lives in the run folder, not on the Hub: no id to name. A
        # built-in GGUF model names the hub model its file was converted from.
        metadata["base_model"] = builtin.upstream if builtin else model_name
        if merged:
            metadata["base_model_relation"] = "finetune"
    metadata["library_name"] = "transformers" if merged else "peft"
    metadata["license"] = license or (
        builtin.license if builtin else base_model_license(model_name)
    )
    datasets = [t["dataset"] for t in tasks if t.get("dataset") and is_hub_dataset(t["dataset"])]
    if datasets:
        metadata["datasets"] = list(dict.fromkeys(datasets))
    kind_tags = [t["kind"].replace("_", "-") for t in tasks if t.get("kind")]
    tags = ["multitune", "lora", "merged" if merged else "peft", *kind_tags]
    metadata["tags"] = list(dict.fromkeys(tags))
    metadata["pipeline_tag"] = "text-generation"
    metadata["model-index"] = [
        {
            "name": _model_title(config, repo_id),
            "results": model_index_results(config, eval_results),
        }
    ]
    return metadata


def base_model_license(model_name: str) -> str:
    """The Hub license id of a known base model family; ``other`` when unknown."""
    for prefix, license_id in BASE_MODEL_LICENSES:
        if model_name.lower().startswith(prefix.lower()):
            return license_id
    return "other"


def is_hub_dataset(dataset: str) -> bool:
    """True for a Hub id (``owner/name`` or ``name``), False for a local file or folder."""
    if dataset.startswith((".", "/", "~")) or dataset.endswith(DATA_FILE_SUFFIXES):
        return False
    if Path(dataset).exists():
        return False
    return dataset.count("/") <= 1 and "\\" not in dataset


def model_index_results(config: dict, eval_results: dict) -> list[dict]:
    """One result per task, listing every metric eval_results.json holds for it."""
    results = []
    for task in config["tasks"]:
        values = eval_results.get("tasks", {}).get(task["name"])
        if not values:
            continue
        dataset = task.get("dataset") or task["name"]
        results.append(
            {
                "task": {"type": HUB_TASK_TYPES.get(task.get("kind"), "text-generation")},
                "dataset": {
                    "name": task["name"],
                    "type": dataset if is_hub_dataset(dataset) else task["name"],
                    "split": eval_results.get("split", "validation"),
                },
                "metrics": [
                    {"type": METRICS[key][0], "value": float(values[key]), "name": METRICS[key][1]}
                    for key in _metric_keys(values)
                ],
            }
        )
    return results


def _metric_keys(values: dict) -> list[str]:
    return [key for key in METRICS if isinstance(values.get(key), (int, float))]


def _model_title(config: dict, repo_id: str | None) -> str:
    return repo_id.split("/")[-1] if repo_id else Path(str(config["output_dir"])).name


def _base_description(config: dict) -> str:
    model = config["model"]
    if model["name"] == TINY_MODEL_NAME:
        size = (model.get("tiny") or {}).get("size", "micro")
        return f"multitune's built-in tiny Llama-architecture model (`{TINY_MODEL_NAME}`, {size})"
    if model["name"] in BUILTIN_GGUF_MODELS:
        builtin = BUILTIN_GGUF_MODELS[model["name"]]
        return (
            f"[{builtin.upstream}](https://huggingface.co/{builtin.upstream}) (licence "
            f"{builtin.license}), read from the GGUF file `{builtin.file_name}` of the "
            f"`{builtin.distribution}` package (`{model['name']}`)"
        )
    if str(model["name"]).endswith(".gguf") or model.get("gguf_file"):
        gguf = model.get("gguf_file")
        return f"the GGUF model `{model['name']}`" + (f" (file `{gguf}`)" if gguf else "")
    return f"[{model['name']}](https://huggingface.co/{model['name']})"


def _intro_section(config: dict, repo_id: str | None, merged: bool) -> str:
    names = ", ".join(f"`{t['name']}` ({t.get('kind')})" for t in config["tasks"])
    what = (
        "LoRA adapter weights merged into the base model; a plain transformers checkpoint"
        if merged
        else "a LoRA adapter (PEFT)"
    )
    lines = [
        f"# {_model_title(config, repo_id)}",
        "",
        f"This is {what} for {_base_description(config)}, fine-tuned with "
        f"multitune on {len(config['tasks'])} task(s) at once: {names}.",
    ]
    if config["model"]["name"] == TINY_MODEL_NAME:
        lines += [
            "",
            "The base model is not on the Hub: it was randomly initialised, together with a "
            "tokenizer trained on the run's own data, and saved in the run's `base_model/` "
            "folder. That is why this card names no `base_model`. It is a smoke-test model; "
            "its scores show the pipeline works, not what a real model can do.",
        ]
    return "\n".join(lines)


def _training_section(config: dict, data_report: dict) -> str:
    lora, train, data = config["lora"], config["train"], config["data"]
    global_batch = train["micro_batch_size"] * train["grad_accum"]
    length = f"{train['epochs']} epoch(s)"
    if train.get("max_steps"):
        length += f", capped at {train['max_steps']} optimizer steps"
    lines = [
        "## Training",
        "",
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"on {', '.join(f'`{m}`' for m in lora['target_modules'])}",
    ]
    if lora.get("modules_to_save"):
        lines.append(f"- Trained in full: {', '.join(f'`{m}`' for m in lora['modules_to_save'])}")
    lines += [
        f"- Length: {length}",
        f"- Optimizer: AdamW, lr {train['lr']:g}, {train['scheduler']} schedule with "
        f"warmup ratio {train['warmup_ratio']:g}, weight decay {train['weight_decay']:g}",
        f"- Batch: {global_batch} examples per step ({train['micro_batch_size']} per micro-batch"
        f" x {train['grad_accum']} accumulation steps)",
        f"- Max sequence length: {data['max_seq_len']} tokens; task mixing: {data['mixing']}; "
        f"seed {config.get('seed', 0)}",
        "",
        "| task | kind | dataset | train | validation | test |",
        "|---|---|---|---:|---:|---:|",
    ]
    for task in config["tasks"]:
        counts = (data_report.get(task["name"]) or {}).get("examples", {})
        dataset = task.get("dataset") or "-"
        shown = f"[{dataset}](https://huggingface.co/datasets/{dataset})"
        lines.append(
            f"| {task['name']} | {task.get('kind')} | "
            f"{shown if is_hub_dataset(dataset) else f'`{dataset}` (local)'} | "
            + " | ".join(str(counts.get(split, "-")) for split in ("train", "validation", "test"))
            + " |"
        )
    lines += [
        "",
        f"Counts are examples. Validation is a stratified {data['validation_fraction']:.0%} of "
        "each task's train split, held out of training; test is the task's own test split, "
        "if it has one.",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _results_section(eval_results: dict) -> str:
    split = eval_results.get("split", "validation")
    tasks = eval_results.get("tasks", {})
    base = (eval_results.get("base") or {}).get("tasks")
    chance = eval_results.get("chance") or {}
    lines = [f"## Results ({split} split)", ""]
    if base:
        lines += [
            "Scores of the base model (adapter disabled) and of the fine-tuned model on the same "
            "examples.",
            "",
            "| task | metric | base | fine-tuned |",
            "|---|---|---:|---:|",
        ]
    else:
        lines += ["| task | metric | fine-tuned |", "|---|---|---:|"]
    for name, values in tasks.items():
        for key in _metric_keys(values):
            row = [name, key]
            if base:
                row.append(_fmt((base.get(name) or {}).get(key)))
            row.append(_fmt(values[key]))
            lines.append("| " + " | ".join(row) + " |")
    counts = ", ".join(f"{name} {values.get('n', '-')}" for name, values in tasks.items())
    lines += ["", f"Examples scored per task: {counts}."]
    guesses = ", ".join(f"{n} {v:.4f}" for n, v in chance.items() if v is not None)
    if guesses:
        lines.append(f"Accuracy of a uniform random guess: {guesses}.")
    lines.append(
        "Loss and perplexity are over answer tokens only; accuracy uses constrained decoding "
        "over the label set (classification) or the choice letters (multiple choice)."
    )
    return "\n".join(lines)


def _usage_section(config: dict, repo_id: str | None, merged: bool) -> str:
    output_dir = str(config["output_dir"])
    tiny = config["model"]["name"] == TINY_MODEL_NAME
    builtin = BUILTIN_GGUF_MODELS.get(config["model"]["name"])
    base_ref = f"{output_dir}/base_model" if tiny else config["model"]["name"]
    base_ref = builtin.upstream if builtin else base_ref
    if merged:
        ref = repo_id or "path/to/this/folder"
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{ref}", dtype="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{ref}")',
        ]
    else:
        ref = repo_id or f"{output_dir}/adapter"
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_ref}", dtype="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{ref}")',
            f'model = PeftModel.from_pretrained(base, "{ref}")',
        ]
    code += [
        "",
        'messages = [{"role": "user", "content": "..."}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "output = model.generate(**inputs, max_new_tokens=32)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]))',
    ]
    lines = ["## How to use", "", "```python", *code, "```"]
    if builtin and not merged:
        lines += [
            "",
            f"The adapter was trained on the dequantized weights of `{builtin.file_name}`, which "
            f"are within 4-bit rounding of `{builtin.upstream}`; for bit-exact results load "
            "the base the way multitune does (`model.name: " + config["model"]["name"] + "`).",
        ]
    if tiny and not merged:
        lines += [
            "",
            "The base model is the `base_model/` folder of the training run "
            f"(`{output_dir}/base_model`); the adapter's `adapter_config.json` points to it.",
        ]
    lines += [
        "",
        "With multitune, from the training run's output folder (prompts are built exactly as in "
        "training):",
        "",
        "```bash",
        f"multitune predict {output_dir} --input rows.jsonl --output predictions.jsonl",
        f"multitune chat {output_dir}",
        "```",
    ]
    return "\n".join(lines)

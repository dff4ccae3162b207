"""`stages: [sft, dpo]` end to end on the bundled sample, through the real CLI.

One run (module fixture) of the nano model: SFT for one epoch, then DPO on pairs mined from the
three closed-answer tasks (24 per task, 9 optimizer steps). The tests read its outputs, then rerun
the DPO stage in the same folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from tests.conftest import SAMPLE, small_config_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitune.cli import main
from multitune.config import validate_config
from multitune.config.schema import DpoConfig
from multitune.data.preference import PreferencePair, tokenize_pairs

pytestmark = pytest.mark.slow


def dpo_config(output_dir: Path, **dpo) -> dict:
    data = small_config_dict(output_dir)
    data["stages"] = ["sft", "dpo"]
    data["dpo"] = {
        "max_pairs": 24,
        "beta": 0.1,
        "train": {"epochs": 1, "lr": 2e-3, "micro_batch_size": 8, "log_every_steps": 1},
        **dpo,
    }
    data["dpo"]["train"]["progress_bar"] = False
    return data


def write_config(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    config = write_config(dpo_config(root / "out"), root / "config.yaml")
    assert main(["train", str(config)]) == 0
    return config, root / "out"


def records(out: Path) -> list[dict]:
    lines = (out / "dpo" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_dpo_logs_rewards_and_the_margin_grows(dpo_run):
    _, out = dpo_run
    train = [r for r in records(out) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 10))
    assert all(r["stage"] == "dpo" for r in train)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert all(key in r for r in train)
    # The logged loss is the preference loss plus dpo.sft_weight (default 1) x the chosen
    # answers' per-token NLL (logged as chosen_nll).
    weight = DpoConfig().sft_weight
    assert weight == 1.0
    preference = [r["loss"] - weight * r["chosen_nll"] for r in train]
    # Step 1 runs the starting policy itself: every reward is 0 and the preference loss log 2.
    assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert preference[0] == pytest.approx(0.693147, abs=1e-4)
    late = [r["rewards/margin"] for r in train[-4:]]
    assert sum(late) / 4 > 0.1, late  # one 8-pair batch may still sit near 0
    assert sum(preference[-4:]) / 4 < 0.66


def test_mined_pairs_have_gold_chosen_and_a_wrong_rejected(dpo_run):
    _, out = dpo_run
    lines = (out / "dpo_pairs.jsonl").read_text().splitlines()
    pairs = [json.loads(line) for line in lines]
    assert {p["source"] for p in pairs} == {"banking77", "commonsense_qa", "text_claims"}
    assert sum(p["split"] == "train" for p in pairs) == 72
    labels = {
        "banking77": set(
            json.loads((out / "data_report.json").read_text())["banking77"]["label_names"]
        ),
        "text_claims": {"Claim", "Not a Claim"},
        "commonsense_qa": set("ABCDE"),
    }
    for pair in pairs:
        assert pair["negative"] == "mined"
        assert pair["chosen"] != pair["rejected"]
        assert {pair["chosen"], pair["rejected"]} <= labels[pair["source"]]
        assert pair["prompt"][-1]["role"] == "user"
        # The SFT model scored the rejected answer above every other wrong one (see unit test);
        # the recorded scores say whether it preferred the gold one.
        assert pair["model_prefers_gold"] == (pair["chosen_logprob"] > pair["rejected_logprob"])


def test_results_show_base_sft_and_dpo_and_dpo_helps_on_held_out_pairs(dpo_run):
    _, out = dpo_run
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["dpo"]) == {"tasks", "adapter", "preference", "warnings"}
    assert results["dpo"]["warnings"] == []  # no task lost more than 2 points
    assert (out / results["dpo"]["adapter"] / "adapter_model.safetensors").is_file()
    preference = results["dpo"]["preference"]
    assert preference["n"] == 34
    assert preference["accuracy_after"] > preference["accuracy_before"]
    for name, sft in results["tasks"].items():
        assert name in results["base"]["tasks"]
        assert results["dpo"]["tasks"][name]["accuracy"] >= sft["accuracy"] - 0.02


def test_reference_logprobs_equal_a_frozen_copy_of_the_starting_model(dpo_run):
    config, out = dpo_run
    cfg = validate_config(yaml.safe_load(config.read_text()))
    cached = torch.load(out / "dpo" / "reference_logprobs.pt", weights_only=True)["logprobs"]
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    lines = (out / "dpo_pairs.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in lines if json.loads(line)["split"] == "train"]
    pairs = [
        PreferencePair(
            p["source"], p["split"], p["row"], tuple(p["prompt"]), p["chosen"], p["rejected"]
        )
        for p in train
    ]
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, cfg)
    assert not dropped and len(tokenized) == len(cached) == 72
    expected = torch.zeros(len(tokenized), 2)
    with torch.no_grad():
        for pair in tokenized:
            for side, example in enumerate((pair.chosen, pair.rejected)):
                # Plain full-logits forward of one unpadded sequence.
                logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
                labels = torch.tensor(example.labels[1:])
                logps = F.log_softmax(logits.float(), dim=-1)
                mask = labels != -100
                expected[pair.index, side] = logps[mask].gather(1, labels[mask, None]).sum()
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-3)
    # data.share_prefix auto: the table was scored with each pair's prompt computed once.
    report = json.loads((out / "dpo" / "pairs_report.json").read_text())
    assert report["train"]["mean_shared_prompt_tokens"] > 20


def test_rerun_reuses_the_reference_cache_and_the_final_checkpoint(dpo_run, caplog):
    config, out = dpo_run
    cache = out / "dpo" / "reference_logprobs.pt"
    mtime = cache.stat().st_mtime_ns
    adapter = load_file(out / "dpo" / "adapter" / "adapter_model.safetensors")
    with caplog.at_level(logging.INFO):
        assert main(["dpo", str(config), "--adapter", str(out / "adapter")]) == 0
    assert "reference log-probs: reusing" in caplog.text
    assert "resumed from step 9" in caplog.text
    assert cache.stat().st_mtime_ns == mtime
    again = load_file(out / "dpo" / "adapter" / "adapter_model.safetensors")
    for name, tensor in adapter.items():
        assert torch.equal(tensor, again[name]), name


def test_resuming_dpo_with_a_changed_dpo_key_is_an_error(dpo_run, capsys):
    config, out = dpo_run
    args = ["dpo", str(config), "--adapter", str(out / "adapter"), "dpo.beta=0.5"]
    assert main(args) == 2
    assert "dpo.beta" in capsys.readouterr().err


def test_dpo_from_a_preference_dataset_in_ultrafeedback_layout(tmp_path, dpo_run):
    _, sft_out = dpo_run
    data = dpo_config(
        tmp_path / "out",
        dataset=str(SAMPLE / "ultrafeedback"),
        split="train_prefs",
        test_split="test_prefs",
        max_pairs=16,
    )
    data["dpo"]["train"]["micro_batch_size"] = 4
    data["dpo"]["train"]["lr"] = 5e-3
    data["eval"]["before_training"] = False
    config = write_config(data, tmp_path / "config.yaml")
    assert main(["dpo", str(config), "--adapter", str(sft_out / "adapter")]) == 0
    out = tmp_path / "out"
    lines = (out / "dpo_pairs.jsonl").read_text().splitlines()
    pairs = [json.loads(line) for line in lines]
    assert sum(p["split"] == "train_prefs" for p in pairs) == 16
    assert sum(p["split"] == "test_prefs" for p in pairs) == 60
    assert all(p["source"] == str(SAMPLE / "ultrafeedback") for p in pairs)
    train = [r for r in records(out) if r["split"] == "train"]
    assert len(train) == 4
    results = json.loads((out / "eval_results.json").read_text())
    assert results["adapter"] == str(sft_out / "adapter")
    assert results["dpo"]["preference"]["n"] == 60


def test_resumed_dpo_ends_with_the_adapter_of_an_uninterrupted_run(tmp_path, dpo_run):
    _, sft_out = dpo_run
    adapters = {}
    for name, stops in (("whole", [None]), ("resumed", [1, None])):
        data = dpo_config(tmp_path / name, max_pairs=8)
        data["dpo"]["train"].update({"scheduler": "constant", "warmup_ratio": 0.0})
        data["eval"].update({"before_training": False, "max_examples": 4})
        for max_steps in stops:
            data["dpo"]["train"]["max_steps"] = max_steps
            config = write_config(data, tmp_path / f"{name}.yaml")
            assert main(["dpo", str(config), "--adapter", str(sft_out / "adapter")]) == 0
        adapters[name] = load_file(
            tmp_path / name / "dpo" / "adapter" / "adapter_model.safetensors"
        )
        steps = [r["step"] for r in records(tmp_path / name) if r["split"] == "train"]
        assert steps == [1, 2, 3], steps  # the second run went on from step 1, not from 0
    assert adapters["whole"].keys() == adapters["resumed"].keys()
    for key, tensor in adapters["whole"].items():
        assert torch.equal(tensor, adapters["resumed"][key]), key

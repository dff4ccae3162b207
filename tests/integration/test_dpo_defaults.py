"""The DPO defaults on the tiny demo (`configs/demo-tiny.yaml stages=[sft,dpo]`, every DPO
setting at its default): no task that SFT learned loses more than 2 points of its accuracy, a
task left at chance moves by no more than its noise, and held-out preference accuracy rises. With `dpo.sft_weight: 0` (plain DPO) the same run took banking77 from
1.000 to 0.875 (README, DPO defaults, measured), so this fails if the NLL term goes."""

import json

import pytest
from tests.integration.test_demo import run_cli


@pytest.mark.slow
def test_default_dpo_keeps_every_task_of_the_tiny_demo_within_two_points(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(
        "train",
        "configs/demo-tiny.yaml",
        "stages=[sft,dpo]",
        f"output_dir={out}",
        "eval.before_training=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    learned = [name for name, sft in results["tasks"].items() if sft["accuracy"] >= 0.5]
    assert {"banking77", "text_claims"} <= set(learned)
    for name, sft in results["tasks"].items():
        after = results["dpo"]["tasks"][name]["accuracy"]
        if name in learned:  # the product's bound: DPO keeps what SFT learned
            assert after >= sft["accuracy"] - 0.02, name
            assert not any(name in warning for warning in results["dpo"]["warnings"])
        else:
            # commonsense_qa stays at chance (5 choices) on the random-init tiny model: it moved
            # 0.256 -> 0.194 with seed 0 and 0.194 -> 0.200 with seed 1, so only a drop beyond
            # three standard errors of its validation accuracy would be DPO's doing.
            n = sft["n"]
            p = sft["accuracy"]
            assert after >= p - 3 * (p * (1 - p) / n) ** 0.5, name
    assert results["tasks"]["banking77"]["accuracy"] > 0.9  # SFT learned it: there is a lot to lose
    preference = results["dpo"]["preference"]
    assert preference["accuracy_after"] > preference["accuracy_before"] + 0.1

"""The DPO stage's config: stage order and loss options are checked at load."""

import pytest
from tests.conftest import small_config_dict

from multitune.config import validate_config
from multitune.config.loader import ConfigError


def config(tmp_path, **top):
    return validate_config({**small_config_dict(tmp_path), **top})


def test_dpo_section_has_its_own_train_settings(tmp_path):
    cfg = config(tmp_path, stages=["sft", "dpo"], dpo={"train": {"lr": 1e-5, "epochs": 3}})
    assert cfg.stages == ["sft", "dpo"]
    assert (cfg.dpo.train.lr, cfg.dpo.train.epochs) == (1e-5, 3)
    assert cfg.train.lr == 3e-3  # the SFT stage's settings are untouched


@pytest.mark.parametrize("stages", [["dpo"], ["dpo", "sft"], ["sft", "sft"], []])
def test_stages_must_be_sft_then_dpo(tmp_path, stages):
    with pytest.raises(ConfigError, match="stages must be \\[sft\\] or \\[sft, dpo\\]"):
        config(tmp_path, stages=stages)


def test_label_smoothing_is_for_the_sigmoid_loss_only(tmp_path):
    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to loss: sigmoid only"):
        config(tmp_path, dpo={"loss": "ipo", "label_smoothing": 0.1})


def test_unknown_dpo_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'dpo.beta'"):
        config(tmp_path, dpo={"betta": 0.2})


def test_a_task_that_dpo_made_worse_by_over_2_points_is_a_warning_in_the_table():
    import io

    from rich.console import Console

    from multitune.evaluation.report import print_summary
    from multitune.recipes.dpo import accuracy_regressions

    sft = {"banking77": {"accuracy": 0.96}, "claims": {"accuracy": 0.5}, "chat": {"bleu": 3.0}}
    dpo = {"banking77": {"accuracy": 0.66}, "claims": {"accuracy": 0.485}, "chat": {"bleu": 1.0}}
    assert accuracy_regressions(sft, dpo) == {"banking77": (0.96, 0.66)}
    results = {
        "tasks": sft,
        "split": "validation",
        "chance": {},
        "dpo": {"tasks": dpo, "warnings": ["task banking77: accuracy 0.960 after SFT -> 0.660"]},
    }
    output = io.StringIO()
    print_summary([], results, Console(file=output, width=200))
    assert (
        "warning: DPO lowered task banking77: accuracy 0.960 after SFT -> 0.660"
        in output.getvalue()
    )

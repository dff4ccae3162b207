from pathlib import Path

import pytest
import yaml
from tests.conftest import REPO, small_config_dict

from multitune.cli import main
from multitune.config import ConfigError, load_config, validate_config
from multitune.config.loader import apply_override, flatten_keys


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_path_and_suggests_closest(tmp_path):
    data = small_config_dict(tmp_path)
    data["train"]["lrr"] = 0.1
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in str(err.value)


def test_unknown_key_inside_a_task_is_found(tmp_path):
    data = small_config_dict(tmp_path)
    data["tasks"][1]["colums"] = {}
    with pytest.raises(
        ConfigError, match=r"unknown key 'tasks\.1\.colums'; did you mean 'tasks\.1\.columns'"
    ):
        load_config(write(tmp_path, data))


def test_wrong_type_names_path_and_expected_type(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, small_config_dict(tmp_path)), ["train.micro_batch_size=big"])
    message = str(err.value)
    assert "train.micro_batch_size" in message
    assert "expected an integer, got 'big'" in message


def test_unknown_task_kind_lists_the_kinds(tmp_path):
    data = small_config_dict(tmp_path)
    data["tasks"][0]["kind"] = "regression"
    with pytest.raises(
        ConfigError, match=r"tasks\.0\.kind.*'classification', 'multiple_choice', 'chat', 'qa'"
    ):
        load_config(write(tmp_path, data))


def test_unknown_preset_lists_presets(tmp_path):
    data = small_config_dict(tmp_path)
    data["tasks"][0]["preset"] = "banking78"
    with pytest.raises(
        ConfigError, match="unknown task preset 'banking78'; built-in presets: banking77"
    ):
        load_config(write(tmp_path, data))


def test_task_without_preset_needs_dataset_and_kind(tmp_path):
    data = small_config_dict(tmp_path)
    data["tasks"] = [{"name": "mine"}]
    with pytest.raises(ConfigError, match=r"tasks\.0 needs dataset, kind"):
        load_config(write(tmp_path, data))


def test_overrides_parse_values_and_reach_nested_keys(tmp_path):
    cfg = load_config(
        write(tmp_path, small_config_dict(tmp_path)),
        [
            "output_dir=/tmp/run",
            "train.max_steps=20",
            "seed=3",
            "lora.target_modules=[q_proj, v_proj]",
            "tasks.2.loss_weight=0.5",
            "train.lr=1e-4",
        ],
    )
    assert str(cfg.output_dir) == "/tmp/run"
    assert cfg.train.max_steps == 20 and cfg.seed == 3 and cfg.train.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.tasks[2].loss_weight == 0.5


def test_override_errors_are_clear():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="'7' is not an index of a list of 3"):
        apply_override({"tasks": [{}, {}, {}]}, "tasks.7.name=x")


def test_defaults_from_the_issue():
    cfg = validate_config({"tasks": [{"preset": "banking77"}]})
    assert cfg.train.epochs == 2
    assert cfg.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert cfg.tasks[0].dataset == "PolyAI/banking77" and cfg.tasks[0].kind == "classification"


def test_preset_values_can_be_overridden():
    cfg = validate_config(
        {"tasks": [{"preset": "commonsense_qa", "name": "csqa", "columns": {"question": "q"}}]}
    )
    task = cfg.tasks[0]
    assert (
        task.name == "csqa" and task.columns.question == "q" and task.columns.answer == "answerKey"
    )
    assert task.test_split == "validation"


@pytest.mark.parametrize(
    "name", ["llama-3.2-1b-multitask-lora.yaml", "llama-3.2-3b-multitask-lora.yaml", "demo.yaml"]
)
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert [t.name for t in cfg.tasks] == ["banking77", "commonsense_qa", "text_claims"]
    if name != "demo.yaml":
        assert cfg.model.name.startswith("meta-llama/Llama-3.2-")
        assert [t.dataset for t in cfg.tasks] == [
            "PolyAI/banking77",
            "tau/commonsense_qa",
            "infinite-dataset-hub/TextClaimsDataset",
        ]


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path, small_config_dict(tmp_path))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err


# A new config knob must be a deliberate diff: update this list with it.
PINNED_KEYS = [
    "output_dir",
    "seed",
    "model.name",
    "model.revision",
    "model.gguf_file",
    "model.dtype",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "model.trust_remote_code",
    "model.tiny.size",
    "model.tiny.vocab_size",
    "model.tiny.tokenizer_vocab_size",
    "model.quantization",
    "model.quant_storage",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.modules_to_save",
    "tasks.*.name",
    "tasks.*.preset",
    "tasks.*.dataset",
    "tasks.*.subset",
    "tasks.*.revision",
    "tasks.*.kind",
    "tasks.*.train_split",
    "tasks.*.test_split",
    "tasks.*.columns.text",
    "tasks.*.columns.label",
    "tasks.*.columns.question",
    "tasks.*.columns.context",
    "tasks.*.columns.choices",
    "tasks.*.columns.answer",
    "tasks.*.columns.messages",
    "tasks.*.label_names",
    "tasks.*.label_mapping",
    "tasks.*.system_prompt",
    "tasks.*.prompt_template",
    "tasks.*.answer_format",
    "tasks.*.sampling_weight",
    "tasks.*.loss_weight",
    "tasks.*.max_examples",
    "data.max_seq_len",
    "data.packing",
    "data.share_prefix",
    "data.validation_fraction",
    "data.mixing",
    "data.temperature",
    "data.template_date",
    "train.epochs",
    "train.max_steps",
    "train.lr",
    "train.scheduler",
    "train.warmup_ratio",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.global_batch_size",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.adam_betas",
    "train.log_every_steps",
    "train.progress_bar",
    "train.compile",
    "eval.batch_size",
    "eval.max_examples",
    "eval.before_training",
    "eval.max_new_tokens",
    "eval.every_steps",
    "eval.best_metric",
    "eval.best_mode",
    "checkpoint.every_steps",
    "checkpoint.every_minutes",
    "checkpoint.keep_last",
    "checkpoint.async_save",
    "tracking.backends",
    "tracking.wandb.project",
    "tracking.wandb.entity",
    "tracking.wandb.name",
    "tracking.wandb.mode",
    "tracking.wandb.tags",
    "hub.push",
    "hub.repo",
    "hub.private",
    "hub.push_checkpoints",
    "distributed.strategy",
    "distributed.timeout_minutes",
    "stages",
    "dpo.train.epochs",
    "dpo.train.max_steps",
    "dpo.train.lr",
    "dpo.train.scheduler",
    "dpo.train.warmup_ratio",
    "dpo.train.micro_batch_size",
    "dpo.train.grad_accum",
    "dpo.train.global_batch_size",
    "dpo.train.weight_decay",
    "dpo.train.max_grad_norm",
    "dpo.train.adam_betas",
    "dpo.train.log_every_steps",
    "dpo.train.progress_bar",
    "dpo.train.compile",
    "dpo.beta",
    "dpo.loss",
    "dpo.label_smoothing",
    "dpo.sft_weight",
    "dpo.negatives",
    "dpo.dataset",
    "dpo.split",
    "dpo.test_split",
    "dpo.tasks",
    "dpo.max_pairs",
    "resume",
]


def test_flattened_key_set_is_pinned():
    assert flatten_keys() == PINNED_KEYS

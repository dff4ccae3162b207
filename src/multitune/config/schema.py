"""Typed, strict configuration tree. Every key a run reads is declared here.

Unknown keys are errors (``extra="forbid"``), so a typo never passes silently; see
``loader.py`` for how pydantic's errors become messages that name the key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TaskKind = Literal["classification", "multiple_choice", "chat", "qa"]
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """Shape of the built-in model (``model.name: builtin:tiny-llama``)."""

    size: Literal["nano", "micro", "small"] = "micro"
    vocab_size: int | None = Field(
        default=None,
        description="Pad the trained tokenizer's vocabulary to this size (128256 = Llama 3.2).",
    )
    tokenizer_vocab_size: int = Field(default=2048, ge=300)


class ModelConfig(Section):
    name: str = "builtin:tiny-llama"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(Section):
    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    modules_to_save: list[Literal["lm_head", "embed_tokens"]] = Field(
        default_factory=list,
        description="Train these modules fully, beside the adapters.",
    )

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraConfig:
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")
        return self


class ColumnsConfig(Section):
    """Maps a dataset's column names onto what a task kind reads. Unset = auto-detect."""

    text: str | None = None
    label: str | None = None
    question: str | None = None
    context: str | None = None
    choices: str | None = None
    answer: str | None = None
    messages: str | None = None


class TaskConfig(Section):
    name: str | None = Field(default=None, description="Defaults to the preset's name.")
    preset: str | None = Field(default=None, description="A built-in task entry, e.g. banking77.")
    dataset: str | None = Field(default=None, description="Hub id, or a local file or folder.")
    subset: str | None = None
    revision: str | None = None
    kind: TaskKind | None = None
    train_split: str = "train"
    test_split: str | None = None
    columns: ColumnsConfig = ColumnsConfig()
    label_names: list[str] | str | None = Field(
        default=None, description="A list, or a path to a file with one label name a line."
    )
    label_mapping: dict[str, str] | None = Field(
        default=None, description="Raw label value -> label name (e.g. {'0': 'Not a Claim'})."
    )
    system_prompt: str | None = None
    prompt_template: str | None = Field(
        default=None, description="Python format string over the row's fields; see README."
    )
    sampling_weight: float | None = Field(default=None, gt=0)
    loss_weight: float = Field(default=1.0, gt=0)
    max_examples: int | None = Field(default=None, gt=0)


class DataConfig(Section):
    max_seq_len: int = Field(default=1024, ge=16)
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    mixing: Literal["proportional", "temperature", "weights"] = "proportional"
    temperature: float = Field(default=1.0, gt=0)
    template_date: str = Field(
        default="26 Jul 2024",
        description="Date written by Llama 3's chat template; pinned so data is reproducible.",
    )


class TrainConfig(Section):
    epochs: int = Field(default=2, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    micro_batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    log_every_steps: int = Field(default=10, gt=0)
    eval_every_steps: int | None = Field(
        default=None, gt=0, description="Validation loss per task every N steps (and at the end)."
    )
    progress_bar: bool = True


class EvalConfig(Section):
    batch_size: int = Field(default=16, gt=0)
    max_examples: int | None = Field(default=None, gt=0, description="Per task, bounds cost.")
    before_training: bool = Field(default=True, description="Score the base model too.")
    max_new_tokens: int = Field(default=64, gt=0)


class CheckpointConfig(Section):
    """When the training loop saves a resumable checkpoint into OUTPUT_DIR/checkpoints.

    A final checkpoint is always written at the end of training, and one on SIGTERM/SIGUSR1.
    """

    every_steps: int | None = Field(default=None, gt=0, description="Every N optimizer steps.")
    every_minutes: float | None = Field(default=None, gt=0, description="Every N minutes.")
    keep_last: int = Field(default=2, ge=1, description="Committed checkpoints kept on disk.")


class WandbConfig(Section):
    """Weights & Biases run settings (``tracking.backends`` must list ``wandb``)."""

    project: str = Field(default="multitune", description="W&B project.")
    entity: str | None = Field(default=None, description="W&B team or user; default: yours.")
    name: str | None = Field(default=None, description="Run name; default: the output dir name.")
    mode: Literal["online", "offline", "disabled"] = Field(
        default="online", description="online needs WANDB_API_KEY; offline writes ./wandb files."
    )
    tags: list[str] = Field(default_factory=list)


class TrackingConfig(Section):
    backends: list[Literal["jsonl", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"],
        description="Where metrics go; OUTPUT_DIR/metrics.jsonl is always written.",
    )
    wandb: WandbConfig = WandbConfig()


class HubConfig(Section):
    """Publishing to the Hugging Face Hub; every push needs HF_TOKEN with write access."""

    push: bool = Field(default=False, description="Push the adapter and card at the end.")
    repo: str | None = Field(default=None, description="Hub model repo, 'user/name'.")
    private: bool = Field(default=False, description="Create the repo private.")
    push_checkpoints: bool = Field(
        default=False,
        description="Mirror each committed checkpoint to the repo's 'checkpoints' branch; "
        "resume: auto downloads the newest when OUTPUT_DIR has none.",
    )

    @model_validator(mode="after")
    def _repo_named(self) -> HubConfig:
        if (self.push or self.push_checkpoints) and not self.repo:
            raise ValueError("hub.push / hub.push_checkpoints need hub.repo (e.g. user/name)")
        if self.repo is not None and self.repo.count("/") != 1:
            raise ValueError(f"hub.repo must look like 'user/name', not {self.repo!r}")
        return self


class RunConfig(Section):
    output_dir: Path = Path("runs/default")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    tasks: list[TaskConfig] = Field(min_length=1)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    hub: HubConfig = HubConfig()
    resume: str = Field(
        default="auto",
        description="'auto' (newest valid checkpoint in OUTPUT_DIR/checkpoints, if any), "
        "'never', or the path of a step folder.",
    )

    @model_validator(mode="after")
    def _task_names_unique(self) -> RunConfig:
        names = [t.name for t in self.tasks if t.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        return self

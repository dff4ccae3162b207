"""Where a plan gets the model's shapes from, without downloading any weights.

In order: a built-in table of known architectures (published ``config.json`` values), the
built-in tiny model, a local ``config.json`` (or a folder holding one), then a hub config that
transformers can load from its cache (or fetch, when online: a few KB, never weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoConfig, LlamaConfig, PretrainedConfig

from multitune.config.schema import ModelConfig
from multitune.models.gguf import gguf_file_of
from multitune.models.tiny import TINY_MODEL_NAME, TINY_SHAPES


class ArchitectureError(ValueError):
    """The model's architecture cannot be found offline; the message lists what is built in."""


_LLAMA3_COMMON = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
}
_LLAMA32_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA31_ROPE = dict(_LLAMA32_ROPE, factor=8.0)
_INSTRUCT_EOS = [128001, 128008, 128009]

_LLAMA32_1B = dict(
    _LLAMA3_COMMON,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_scaling=_LLAMA32_ROPE,
)
_LLAMA32_3B = dict(
    _LLAMA3_COMMON,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    rope_scaling=_LLAMA32_ROPE,
)
_LLAMA31_8B = dict(
    _LLAMA3_COMMON,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
    rope_scaling=_LLAMA31_ROPE,
)

# LlamaConfig kwargs from each repo's published config.json (base: eos 128001).
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "meta-llama/Llama-3.2-1B": dict(_LLAMA32_1B, eos_token_id=128001),
    "meta-llama/Llama-3.2-1B-Instruct": dict(_LLAMA32_1B, eos_token_id=_INSTRUCT_EOS),
    "meta-llama/Llama-3.2-3B": dict(_LLAMA32_3B, eos_token_id=128001),
    "meta-llama/Llama-3.2-3B-Instruct": dict(_LLAMA32_3B, eos_token_id=_INSTRUCT_EOS),
    "meta-llama/Llama-3.1-8B": dict(_LLAMA31_8B, eos_token_id=128001),
    "meta-llama/Llama-3.1-8B-Instruct": dict(_LLAMA31_8B, eos_token_id=_INSTRUCT_EOS),
}


@dataclass(frozen=True)
class Shape:
    """The numbers every estimate reads, for a Llama-style decoder (no biases)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass
class Architecture:
    name: str
    source: str  # how the shapes were found
    config: PretrainedConfig
    shape: Shape
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, **asdict(self.shape)}


def shape_of(config: PretrainedConfig) -> Shape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def tiny_config(cfg: ModelConfig) -> LlamaConfig:
    """The built-in tiny model's config with the largest vocabulary its tokenizer can reach."""
    hidden, layers, heads, kv_heads, intermediate = TINY_SHAPES[cfg.tiny.size]
    return LlamaConfig(
        vocab_size=max(cfg.tiny.tokenizer_vocab_size, cfg.tiny.vocab_size or 0),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )


def resolve_architecture(cfg: ModelConfig) -> Architecture:
    """Find the model's config without touching weights; raise ``ArchitectureError`` if offline."""
    if cfg.name in KNOWN_ARCHITECTURES:
        config = LlamaConfig(**KNOWN_ARCHITECTURES[cfg.name])
        return Architecture(cfg.name, "built-in table", config, shape_of(config))
    if cfg.name == TINY_MODEL_NAME:
        config = tiny_config(cfg)
        note = (
            f"vocab {config.vocab_size} is an upper bound: the built-in tokenizer is trained on "
            "the task data (model.tiny.tokenizer_vocab_size), padded to model.tiny.vocab_size"
        )
        return Architecture(cfg.name, "built-in tiny model", config, shape_of(config), [note])
    gguf = gguf_file_of(cfg.name, cfg.gguf_file, cfg.revision)
    if gguf is not None:  # the file's metadata holds the config; no weights are read
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return Architecture(cfg.name, str(gguf), config, shape_of(config))
    path = Path(cfg.name).expanduser()
    if path.exists():
        folder = path.parent if path.is_file() else path
        if not (folder / "config.json").is_file():
            raise ArchitectureError(f"{path}: no config.json there to read the model's shapes from")
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        return Architecture(cfg.name, f"{folder / 'config.json'}", config, shape_of(config))
    try:
        config = AutoConfig.from_pretrained(
            cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:
        built_in = ", ".join([*KNOWN_ARCHITECTURES, TINY_MODEL_NAME])
        raise ArchitectureError(
            f"cannot read the config of {cfg.name}: it is not built in, not a local path, and "
            f"not in the hub cache ({type(exc).__name__}). Built in: {built_in}. Or set "
            "model.name to a folder holding its config.json, or fetch the config once with a "
            f"network: `hf download {cfg.name} config.json`"
        ) from exc
    return Architecture(cfg.name, "hub config (cache)", config, shape_of(config))

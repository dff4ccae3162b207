"""`multitune doctor`: what this machine will run with (versions, device, C++ ops, attention)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil

PACKAGES = ("multitune", "torch", "transformers", "peft", "datasets", "accelerate")


def report() -> list[tuple[str, str]]:
    """(item, finding) rows; building the C++ extension here if it is not cached yet."""
    # Imported here: the CLI's other commands should not pay torch's import time.
    from multitune import ops
    from multitune.ops.extension import extension_dir, extension_error_summary

    rows = [("python", f"{platform.python_version()} ({platform.machine()}, {platform.system()})")]
    for name in PACKAGES:
        rows.append((name, _version(name) or "not installed"))
    rows.append(("device", _device()))
    backend = ops.active_backend()
    if backend == "cpp":
        rows.append(("C++ ops", f"active (compiled extension, cache {extension_dir()})"))
    else:
        reason = extension_error_summary() or "unknown"
        rows.append(("C++ ops", f"FALLBACK to the PyTorch reference: {reason}"))
    rows.append(("flash-attn", _flash_attn()))
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    rows.append(("C++ compiler", compiler or "none on PATH (no C++ ops, no torch.compile on CPU)"))
    return rows


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device() -> str:
    import torch

    threads = f"{torch.get_num_threads()} CPU threads"
    if not torch.cuda.is_available():
        return f"cpu ({threads}; no CUDA device)"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"cuda: {torch.cuda.device_count()} x {names} (CUDA {torch.version.cuda}; {threads})"


def _flash_attn() -> str:
    import torch

    if importlib.util.find_spec("flash_attn") is None:
        return "not installed (attention uses sdpa; packed rows get a block-diagonal mask)"
    version = _version("flash-attn") or "unknown version"
    if not torch.cuda.is_available():
        return f"installed ({version}), unused without CUDA"
    return f"installed ({version}); model.attn_implementation=auto uses flash_attention_2"


def cmd_doctor(args) -> int:
    rows = report()
    width = max(len(item) for item, _ in rows)
    for item, finding in rows:
        print(f"{item.ljust(width)}  {finding}")
    return 0

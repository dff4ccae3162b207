"""Build, load and select the C++ backend of the multitune ops.

torch is not a build requirement of the package (an isolated build would pull a multi-GB
torch), so the C++ sources in ``csrc/`` are compiled on first use with
``torch.utils.cpp_extension.load`` against whatever torch is installed, and cached.

``csrc/`` lives at the repository root, next to ``src/``; it is found relative to this file,
which covers the repo and editable installs. A wheel install has no repository around it, so
there ``MULTITUNE_CSRC`` must point at a ``csrc/`` checkout.

If the extension cannot be built or loaded, every op falls back to its pure PyTorch reference
(same results, O(N x V) memory for the linear ops) after one warning per process.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EXTENSION_NAME = "multitune_ops"
CPP = "cpp"
REFERENCE = "reference"

# Modules whose register_kernels() adds fake (meta) and autograd kernels to the C++ ops.
_PYTHON_KERNEL_MODULES = (
    "multitune.ops.linear_cross_entropy",
    "multitune.ops.linear_token_logprobs",
)

# A build lock this old was left by a killed build (a build takes about a minute here).
STALE_LOCK_SECONDS = 600.0

_lock = threading.Lock()
_backend: str | None = None
_error: str | None = None
_warned = False
_kernels_registered = False


def find_csrc() -> Path:
    """The ``csrc/`` folder: beside ``src/`` in the repo, else ``$MULTITUNE_CSRC``.

    Raises FileNotFoundError naming both places when neither holds ``registration.cpp``.
    """
    beside_src = Path(__file__).resolve().parents[3] / "csrc"
    candidates = [beside_src]
    if os.environ.get("MULTITUNE_CSRC"):
        candidates.append(Path(os.environ["MULTITUNE_CSRC"]).expanduser())
    for folder in candidates:
        if (folder / "registration.cpp").is_file():
            return folder
    raise FileNotFoundError(
        f"multitune C++ sources not found in {beside_src} (repo layout); "
        "set MULTITUNE_CSRC to a checkout's csrc/ folder"
    )


def extension_dir() -> Path:
    """Build cache: ``$MULTITUNE_EXTENSION_DIR`` or ``~/.cache/multitune/torch_extensions``.

    A subfolder per Python and torch version keeps an upgrade from loading a stale binary
    built against another ABI, and per checkout: the build command names the checkout's
    ``csrc/``, so two checkouts sharing a folder rebuilt it over each other on every first use
    (about 30 s, with every torchrun worker waiting on the build lock).
    """
    root = os.environ.get("MULTITUNE_EXTENSION_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "multitune" / "torch_extensions"
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    checkout = hashlib.sha256(str(Path(__file__).resolve().parents[3]).encode()).hexdigest()[:8]
    return base.expanduser() / f"{python_tag}_torch{torch.__version__.replace('+', '_')}_{checkout}"


def _build() -> None:
    """Compile (or reuse the cached build of) the extension and load it into torch.ops."""
    from torch.utils import cpp_extension

    csrc = find_csrc()
    build_dir = extension_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_build_lock(build_dir)
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=sorted(str(path) for path in csrc.glob("*.cpp")),
        extra_cflags=["-O3"],
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        is_python_module=False,  # ops register through TORCH_LIBRARY, no pybind module
        verbose=False,
    )


def clear_stale_build_lock(build_dir: Path, stale_after: float = STALE_LOCK_SECONDS) -> None:
    """Wait for another process's build of ``build_dir``, and remove its lock if it is stale.

    torch's builder holds a ``lock`` file while it compiles and waits, without a limit, while
    one exists. A build killed midway (Ctrl-C, the OOM killer, a preempted node) leaves the
    file behind, and every later run then hung silently at its first op. A build takes about
    a minute, so a lock older than ``stale_after`` seconds is a dead one: it is removed, with a
    warning, and this process builds.
    """
    lock = build_dir / "lock"
    announced = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            logger.warning(
                "removing the C++ extension's build lock %s: %.0f s old, so the build that "
                "held it is dead",
                lock,
                age,
            )
            lock.unlink(missing_ok=True)
            return
        if not announced:
            logger.info("waiting for another process's C++ extension build (lock %s)", lock)
            announced = True
        time.sleep(min(1.0, stale_after))


def _register_python_kernels() -> None:
    global _kernels_registered
    if _kernels_registered:  # torch refuses a second fake kernel for the same op
        return
    for module_name in _PYTHON_KERNEL_MODULES:
        importlib.import_module(module_name).register_kernels()
    _kernels_registered = True


def _explain(exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}".strip()
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        message += "\n(no C++ compiler on PATH; install g++ or set CXX)"
    return message


def _summarise(error: str) -> str:
    """First line plus the first compiler error: a full ninja log is too long for a warning."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    picked = lines[:1] + [line for line in lines[1:] if "error" in line.lower()][:1]
    picked += [line for line in lines if line.startswith("(no C++ compiler")]
    return " | ".join(line[:300] for line in dict.fromkeys(picked))


def _resolve() -> None:
    global _backend, _error, _warned
    with _lock:
        if _backend is not None:
            return
        if os.environ.get("MULTITUNE_DISABLE_CPP") == "1":
            _backend, _error = REFERENCE, "disabled by MULTITUNE_DISABLE_CPP=1"
            logger.info("multitune ops: using the PyTorch reference (MULTITUNE_DISABLE_CPP=1)")
            return
        try:
            _build()
            _register_python_kernels()
        except Exception as exc:  # any build or load failure means: use the reference
            _backend, _error = REFERENCE, _explain(exc)
            if not _warned:
                _warned = True
                logger.warning(
                    "multitune C++ ops unavailable, using the PyTorch reference instead "
                    "(same results, but full [N, V] logits in memory): %s. "
                    "Full log: multitune.ops.extension_error()",
                    _summarise(_error),
                )
            return
        _backend, _error = CPP, None


# Under torch.compile, Dynamo calls this eagerly and treats the answer as a constant, so a
# first op call inside a compiled region builds the extension without a graph break.
@torch.compiler.assume_constant_result
def active_backend() -> str:
    """``"cpp"`` when the compiled ops are in use, else ``"reference"``; builds on first call."""
    if _backend is None:
        _resolve()
    return _backend


def extension_error() -> str | None:
    """Why the C++ backend is not in use (build error, or disabled), or None when it is."""
    if _backend is None:
        _resolve()
    return _error


def extension_error_summary() -> str | None:
    """``extension_error()`` cut to its first line and first compiler error, for one line."""
    error = extension_error()
    return None if error is None else _summarise(error)

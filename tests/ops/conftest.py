"""Shared fixtures for the C++ op tests: the extension is built once per session."""

from __future__ import annotations

import os
import shutil

import pytest

from multitune.ops import extension


@pytest.fixture(scope="session")
def cpp_backend() -> None:
    """Build (or load from cache) the C++ extension; ~30 s on 2 cores the first time.

    Skips only where a build cannot be expected (no compiler, or disabled on purpose); with a
    compiler present, a failed build fails the tests instead of hiding behind the fallback.
    """
    if extension.active_backend() == extension.CPP:
        return
    if os.environ.get("MULTITUNE_DISABLE_CPP") == "1":
        pytest.skip("C++ ops disabled by MULTITUNE_DISABLE_CPP=1")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip(f"no C++ compiler: {extension.extension_error()}")
    pytest.fail(f"C++ extension failed to build:\n{extension.extension_error()}")

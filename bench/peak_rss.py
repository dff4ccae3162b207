"""Peak resident memory of this process on Linux, read from /proc (shared by the benchmarks)."""

from __future__ import annotations


def reset_peak_rss() -> int:
    """Reset the peak-RSS counter (VmHWM) to the current RSS, and return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Peak RSS in bytes since the last ``reset_peak_rss``."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")

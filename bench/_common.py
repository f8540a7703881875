"""Helpers shared by the bench scripts: timing, medians, cache dropping, ratio lines."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable


def drop_caches() -> bool:
    """Cold reads for both contenders; False where the machine does not allow it (then both run warm)."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def machine_load() -> str:
    """For the caveats line: other work on the machine moves every figure here."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (pct in 0..100) of a small sample; NaN when it is empty."""
    data = sorted(v for v in values if v == v)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * pct / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def write_random_extents(path: str, size: int, fraction: float, block: int = 4 << 20) -> int:
    """A raw image of `size` bytes with `fraction` of it random data, spread over the whole disk."""
    written = 0
    step = int(block / fraction)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in range(0, size, step):
            fh.seek(offset)
            fh.write(os.urandom(min(block, size - offset)))
            written += min(block, size - offset)
    return written

"""Helpers shared by the bench scripts: timing, medians, cache dropping, ratio lines."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


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


def process_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of one process (reaped children included), in seconds: a server's CPU
    moves far less than wall time on this shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def client_cpu() -> float:
    """This process and the tools it ran and reaped (cp, smbclient, sftp, curl, qemu-img), in seconds."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

"""Small helpers for the end-to-end tests: configs, the hotvm CLI as a subprocess, guest-like writers."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qemu_helpers import RunningQemu

KiB64 = 64 * 1024


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `mount` (a file system that fills up, or that refuses O_DIRECT); the test
    is skipped where it cannot be mounted (not root)."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip(f"needs root to mount a {size} tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def write_config(
    path: Path, vms: dict[str, Path], target_url: str, host_name: str = "", **host: object
) -> Path:
    """A hotvm.yaml for one host; the host name defaults to one unique to the test (its own backup slots)."""
    lines = ["hosts:", f"  - name: {host_name or 'h-' + path.parent.name}"]
    lines += [f"    {k}: {v}" for k, v in host.items()]
    lines.append("    vms:")
    for name, qmp in vms.items():
        lines += [f"      - name: {name}", f"        qmp: {qmp}"]
    lines += ["targets:", "  - name: nas", f"    url: {target_url}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def hotvm(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m hotvm`) in a child process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "hotvm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"hotvm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def hotvm_json(*args: str) -> dict | list:
    return json.loads(hotvm(*args, "--json").stdout)


PAUSEPOINT = Path(__file__).with_name("pausepoint.py")
"""Runs the CLI held before it opens a given blob (`python PAUSEPOINT NAME FIFO hotvm-arguments...`)."""


@contextmanager
def blocked_reading(fifo: Path, proc: subprocess.Popen, timeout: float = 120) -> Iterator[None]:
    """Waits until `proc` blocks reading the FIFO `fifo` (tests/pausepoint.py reads it before the blob it
    holds at), and keeps it blocked inside the `with`: a SIGKILL sent there lands at exactly that point of the
    run, however fast or loaded the machine. The wait polls a state that, once reached, lasts."""
    deadline = time.monotonic() + timeout
    while True:
        try:  # a non-blocking open for writing succeeds only once a reader has the FIFO open
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before it read {fifo.name}"
        assert time.monotonic() < deadline, f"the process never read {fifo.name}"
        time.sleep(0.01)
    try:
        yield  # no byte is ever written: the reader waits in read() until it is killed or we close
    finally:
        os.close(writer)


class SequentialWriter(threading.Thread):
    """Writes block n with byte pattern (n % 250) + 1 at offset n*64 KiB, in order, like a log.

    Any point-in-time copy of such a disk is a prefix: blocks 0..k written, everything after empty.
    """

    def __init__(self, vm: RunningQemu, device: str, start: int = 0, limit: int = 512) -> None:
        super().__init__(daemon=True)
        self.vm, self.device, self.next, self.limit = vm, device, start, limit
        self.stop_event = threading.Event()

    def write_block(self, n: int) -> None:
        self.vm.qemu_io(self.device, f"write -P {pattern(n)} {n * KiB64} {KiB64}")

    def run(self) -> None:
        while not self.stop_event.is_set() and self.next < self.limit:
            self.write_block(self.next)
            self.next += 1

    def stop(self) -> int:
        self.stop_event.set()
        self.join(30)
        return self.next


def pattern(n: int) -> int:
    return (n % 250) + 1


def written_prefix(image: Path, fmt: str, blocks: int) -> int:
    """How many leading blocks hold their pattern; asserts everything after them is still empty."""
    raw = image
    if fmt != "raw":
        raw = image.with_suffix(".check.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    data = raw.read_bytes()
    if raw != image:
        raw.unlink()
    k = 0
    while k < blocks and data[k * KiB64 : (k + 1) * KiB64] == bytes([pattern(k)]) * KiB64:
        k += 1
    tail = data[k * KiB64 : blocks * KiB64]
    assert tail == bytes(len(tail)), f"block {k} is torn or written out of order: not a point-in-time copy"
    return k

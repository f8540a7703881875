"""Small process helpers around qemu-system-x86_64: the command line, liveness, QMP `quit`, serial logs.

No asyncio QMP client here on purpose: stopping a VM must work from any thread or event loop, and a
stuck monitor (someone else connected) must fail fast so the caller can fall back to signals.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.guest.errors import GuestError

QEMU = "qemu-system-x86_64"
BASE_APPEND = "console=ttyS0 quiet panic=-1"
MEMORY_MB = 256
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if not path:
        raise GuestError(f"{QEMU} is not installed", "apt-get install qemu-system-x86 qemu-utils")
    return path


def qemu_version() -> str:
    version = [qemu_binary(), "--version"]
    out = subprocess.run(version, capture_output=True, text=True, timeout=30, env=child_env()).stdout
    return out.splitlines()[0] if out else "unknown"


def accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", "tcg"]
    raise GuestError(f"unknown accelerator {accel!r}", "use 'tcg' or 'kvm'")


def guest_command(kernel: Path, initrd: Path, serial_log: Path, accel: str, append: str = "") -> list[str]:
    """Everything but the disk and the monitors: a headless, network-less, single-vCPU guest that exits
    (instead of rebooting) if its /init dies, so a failed boot is seen as a dead process."""
    fixed = (
        f"-nodefaults -no-user-config -machine pc -m {MEMORY_MB} -smp 1 -display none -nic none -no-reboot"
    )
    return [
        qemu_binary(),
        *fixed.split(),
        *accel_args(accel),
        *("-kernel", str(kernel), "-initrd", str(initrd), "-append", f"{BASE_APPEND} {append}".strip()),
        *("-serial", f"file:{serial_log}"),
    ]


def qmp_args(sock: Path) -> list[str]:
    check_socket_path(sock)
    return ["-qmp", f"unix:{sock},server=on,wait=off"]


def check_socket_path(sock: Path) -> None:
    if len(str(sock)) > UNIX_PATH_MAX:
        raise GuestError(
            f"socket path too long for a unix socket ({len(str(sock))} > {UNIX_PATH_MAX}): {sock}",
            "use a shorter state dir (--state-dir or HOTVM_STATE_DIR)",
        )


def escape_opt(value: str) -> str:
    """QEMU's key=value option syntax doubles commas inside values."""
    return value.replace(",", ",,")


def render_script(cmd: list[str], comment: str) -> str:
    """A readable shell script that runs exactly `cmd` (one option per line)."""
    lines: list[str] = [shlex.quote(cmd[0])]
    for arg in cmd[1:]:
        if arg.startswith("-"):
            lines.append(shlex.quote(arg))
        else:
            lines[-1] += " " + shlex.quote(arg)
    return f"#!/bin/sh\n# {comment}\nexec " + " \\\n  ".join(lines) + "\n"


# --------------------------------------------------------------------------- processes


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


PF_KTHREAD = 0x00200000  # /proc/<pid>/stat flags: a kernel thread (never one of our processes)


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """True until the last thread of `pid` has exited and, given a marker, if its command line contains it:
    a pid from an old pidfile may have been reused by an unrelated process.

    Not just the main thread: SIGKILLed, QEMU's main thread is a zombie at once while its I/O threads are
    still exiting (one in fdatasync can take long on a busy disk), and those hold its open files, so the
    image locks, until the last one is gone. "Not running" must mean the disk can be opened. A process on
    its way out has no command line left: that one counts as ours."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    try:
        fields = (proc / "stat").read_text().rpartition(")")[2].split()
        cmdline = (proc / "cmdline").read_bytes()
        threads = os.listdir(proc / "task")
    except OSError:
        return False
    if int(fields[6]) & PF_KTHREAD or (marker is not None and cmdline and marker.encode() not in cmdline):
        return False
    for tid in threads:
        try:
            state = (proc / "task" / tid / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue  # that thread is gone
        if state not in ("Z", "X"):
            return True
    return False


def terminate(pid: int, marker: str | None, grace: float = 10.0) -> None:
    """SIGTERM (QEMU shuts down cleanly on it), then SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid, marker):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_exit(pid, marker, wait):
            return
    raise GuestError(f"QEMU (pid {pid}) survived SIGKILL", "check for a hung process (state D) with ps")


def wait_exit(pid: int, marker: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- serial console


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(read_text(path).replace("\r", "").splitlines()[-lines:])


def wait_for(
    path: Path, pattern: re.Pattern[str], timeout: float, alive: Callable[[], bool], start: int = 0
) -> re.Match[str] | None:
    """First match of `pattern` in the log at or after offset `start`; None on timeout or when `alive()`
    turns false (after one last read, so a line written just before exiting is not missed)."""
    deadline = time.monotonic() + timeout
    while True:
        running = alive()
        match = pattern.search(read_text(path), start)
        if match or not running or time.monotonic() > deadline:
            return match
        time.sleep(0.05)

"""One backup of a VM at a time on this machine, released by the kernel the moment its holder dies.

A second run on the same VM would otherwise "reconcile" (commit) the overlays the first run is still
exporting from. flock, unlike a lease, frees the lock at once when a backup process is killed, so the
rerun that follows a crash can start immediately.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hotvm.errors import HotvmError

LOCK_DIR_ENV = "HOTVM_LOCK_DIR"


class BackupRunning(HotvmError):
    pass


def lock_dir() -> Path:
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    return Path("/run/hotvm") if os.access("/run", os.W_OK) else Path("/tmp/hotvm")


@contextmanager
def vm_lock(host: str, vm: str) -> Iterator[None]:
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{host}--{vm}.lock".replace("/", "_")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise BackupRunning(
                f"a backup of VM '{vm}' on host '{host}' is already running (pid {holder})",
                "wait for it to finish, or stop it; a killed backup releases the VM at once",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)

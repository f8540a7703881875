"""Locks tied to the life of the process that holds them: flock, which the kernel frees the instant it dies.

- `vm_lock`: one backup of a VM at a time on this machine. A second run on the same VM would otherwise
  "reconcile" (commit) the overlays the first run is still exporting from; holding it proves the last
  holder is gone, so its overlays may be committed back.
- `host_slot_lock`: one of a host's N backup slots on this machine (N files, each taken by flock). Unlike a
  server lease, a killed holder's slot is free at once, so the next run never waits for a dead one.

The directory is private, because whoever can write in it can hold our locks or plant a symlink for us to
write through: /run/hotvm for root, else $XDG_RUNTIME_DIR/hotvm, else /tmp/hotvm-<uid> ($HOTVM_LOCK_DIR
overrides). It is opened without following a symlink, must be owned by the user, and is kept mode 0700.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hotvm.errors import HotvmError

LOCK_DIR_ENV = "HOTVM_LOCK_DIR"
SLOT_POLL_S = 0.2


class BackupRunning(HotvmError):
    pass


class LockDirUnsafe(HotvmError):
    """The lock directory could let another user hold our locks or redirect our writes."""


def lock_dir() -> Path:
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    if os.geteuid() == 0:
        return Path("/run/hotvm")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "hotvm"
    return Path(f"/tmp/hotvm-{os.geteuid()}")


def _unsafe(path: Path, why: str) -> LockDirUnsafe:
    return LockDirUnsafe(
        f"lock directory {path} {why}",
        f"remove it (or set {LOCK_DIR_ENV} to a directory of your own, mode 0700) and rerun",
    )


def open_lock_dir() -> int:
    """A file descriptor of the private lock directory, created if missing (mode 0700), checked if not."""
    path = lock_dir()
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise _unsafe(path, "is a symbolic link") from None
        raise _unsafe(path, f"cannot be opened ({exc.strerror})") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise _unsafe(path, f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)  # ours: tighten it (an older hotvm created it 0755)
    return fd


def _open_lock_file(name: str) -> int:
    """Open (create) a lock file in the lock directory: never through a symlink, never someone else's."""
    directory = open_lock_dir()
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name.replace("/", "_"), flags, 0o600, dir_fd=directory)
        except OSError as exc:
            raise _unsafe(lock_dir(), f"holds {name} that cannot be opened safely ({exc.strerror})") from None
    finally:
        os.close(directory)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise _unsafe(lock_dir(), f"holds {name} owned by another user")
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def vm_lock(host: str, vm: str) -> Iterator[None]:
    fd = _open_lock_file(f"{host}--{vm}.lock")
    try:
        if not _try_flock(fd):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise BackupRunning(
                f"a backup of VM '{vm}' on host '{host}' is already running (pid {holder})",
                "wait for it to finish, or stop it; a killed backup releases the VM at once",
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass
class HeldSlot:
    """A host slot this process holds; `left_behind` is what its last holder recorded (see `record`)."""

    fd: int
    index: int
    left_behind: str

    def record(self, text: str) -> None:
        """Note what the holder must give back if it dies (e.g. a server lease id), for the next holder."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)


@contextmanager
def host_slot_lock(host: str, limit: int, on_wait: Callable[[], None] | None = None) -> Iterator[HeldSlot]:
    """Take one of the host's `limit` slot files on this machine, waiting until one is free.

    `on_wait()` is called once if every slot is taken. What a holder records stays in the file after it
    ends: a holder records what it must give back (a lease) and clears that once given back, so whatever
    the next holder finds there (`left_behind`) was left by a holder that died."""
    fds: list[int] = []
    held: HeldSlot | None = None
    try:
        for i in range(limit):
            fds.append(_open_lock_file(f"{host}--slot{i}.lock"))
        waited = False
        while held is None:
            for index, fd in enumerate(fds):
                if _try_flock(fd):
                    left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                    held = HeldSlot(fd, index, left)
                    break
            else:
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(SLOT_POLL_S)
        yield held
    finally:
        for fd in fds:
            os.close(fd)

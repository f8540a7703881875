"""The durable record of one instant restore: `DIR/instant.json` (0600) in the restore directory.

It says which VM runs (or will run) on which overlays, which backup set, target and chunk cache they still
depend on, and how far the stream got; so a rerun of the same command resumes, and `hotvm status` finds
VMs that still need a repository (through a small index of restore directories). Whether a disk still
depends on the repository is always read back from the overlay itself (its backing file), never trusted
from this file alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from hotvm.errors import HotvmError
from hotvm.guest.qemu import UNIX_PATH_MAX

STATE_NAME = "instant.json"
INDEX_ENV = "HOTVM_INSTANT_INDEX"
Status = Literal["starting", "streaming", "stream-failed", "complete"]


class InstantDisk(BaseModel):
    device: str
    overlay: str
    """The local qcow2 image: overlay over the repository while streaming, the whole disk after."""
    node: str
    virtual_size: int


class InstantState(BaseModel):
    vm: str
    backup_id: str
    target: str
    dest: str
    run_dir: str
    """0700: the NBD and QMP sockets, pid files, nbdkit's log, the plugin's fetch and problem logs."""
    cache_dir: str | None = None
    runner: Literal["vm", "storage-daemon"] = "vm"
    status: Status = "starting"
    error: str | None = None
    speed: int = 0
    created_at: str
    stream_started_at: str | None = None
    stream_finished_at: str | None = None
    stream_seconds: float | None = None
    disks: list[InstantDisk]

    @property
    def path(self) -> Path:
        return Path(self.dest) / STATE_NAME

    @property
    def qmp(self) -> Path:
        return Path(self.run_dir) / "qmp.sock"

    @property
    def qmp_user(self) -> Path:
        """A second monitor for the user (QMP serves one client per socket): hotvm keeps qmp.sock."""
        return Path(self.run_dir) / "qmp-user.sock"

    @property
    def nbd_socket(self) -> Path:
        return Path(self.run_dir) / "nbd.sock"

    @property
    def serial_log(self) -> Path:
        return Path(self.dest) / "serial.log"

    @property
    def pidfile(self) -> Path:
        return Path(self.run_dir) / "qemu.pid"

    def save(self) -> None:
        """Atomically (a full disk leaves the previous state whole, and raises)."""
        tmp = self.path.with_name(STATE_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.model_dump_json(indent=2))
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise HotvmError(f"cannot update {self.path}: {exc.strerror}", "free space there") from None
        _index(self)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def load_state(dest: Path) -> InstantState | None:
    try:
        return InstantState.model_validate_json((dest / STATE_NAME).read_text())
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError):
        raise HotvmError(
            f"{dest / STATE_NAME} is unreadable", "restore into a new directory; the overlays there are kept"
        ) from None


def run_dir_for(dest: Path) -> Path:
    """dest/run when its sockets fit a unix socket path, else a stable private directory in /tmp."""
    run = dest / "run"
    if len(str(run / "qmp.sock")) > UNIX_PATH_MAX - 4:
        run = Path("/tmp") / f"hotvm-instant-{hashlib.sha256(str(dest).encode()).hexdigest()[:16]}"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run, 0o700)
    return run


# ---- the index `hotvm status` reads: one small file per restore directory


def index_dir() -> Path:
    default = Path.home() / ".local" / "state" / "hotvm" / "instant"
    return Path(os.environ.get(INDEX_ENV) or default)


def _index(state: InstantState) -> None:
    root = index_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    entry = root / (hashlib.sha256(state.dest.encode()).hexdigest()[:16] + ".json")
    body = json.dumps({"dest": state.dest, "vm": state.vm})
    if not entry.exists() or entry.read_text() != body:
        entry.write_text(body)


def indexed_restores() -> list[InstantState]:
    """Every instant restore this host knows of whose directory still exists."""
    states = []
    root = index_dir()
    if not root.is_dir():
        return []
    for entry in sorted(root.glob("*.json")):
        try:
            dest = Path(json.loads(entry.read_text())["dest"])
            state = load_state(dest)
        except (OSError, ValueError, KeyError, HotvmError):
            state = None
        if state is None:
            entry.unlink(missing_ok=True)
        else:
            states.append(state)
    return states


def forget(state: InstantState) -> None:
    """Drop a finished restore from the index: its directory is now just a VM's local disks."""
    (index_dir() / (hashlib.sha256(state.dest.encode()).hexdigest()[:16] + ".json")).unlink(missing_ok=True)

"""Shared fixtures. A real Prefect server on loopback (started once per session) runs every flow test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Settings must be in the environment before prefect is first imported (here and in CLI subprocesses).
_PREFECT_HOME = tempfile.mkdtemp(prefix="hotvm-prefect-")
_PREFECT_PORT = _free_port()
os.environ.update(
    {
        "PREFECT_HOME": _PREFECT_HOME,
        "PREFECT_API_URL": f"http://127.0.0.1:{_PREFECT_PORT}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # Repository identities this test session remembers (hotvm/formats/identity.py), never the host's.
        "HOTVM_SECURITY_DIR": tempfile.mkdtemp(prefix="hotvm-security-"),
        # Backup locks and host slots (hotvm/locks.py) of this session only: pytest-xdist's workers run
        # tests whose hosts and VMs share names at the same time; in the machine-wide /run/hotvm they would
        # take each other's slots (and a slot's record of a lease on another worker's Prefect server).
        "HOTVM_LOCK_DIR": tempfile.mkdtemp(prefix="hotvm-locks-"),
    }
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _own_repository_identities(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test remembers repository identities in its own store: servers on reused ports and paths, or a
    target re-created at a tmp path, are new repositories to it, not a swapped one."""
    monkeypatch.setenv("HOTVM_SECURITY_DIR", str(tmp_path_factory.mktemp("security")))


@pytest.fixture
def qemu(tmp_path: Path):
    """start([DiskSpec, ...]) -> a bare TCG QEMU with those disks; every one is stopped after the test."""
    from qemu_helpers import start_qemu

    started = []

    def start(disks):  # noqa: ANN001, ANN202
        vm = start_qemu(tmp_path, disks)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 12 MiB tmpfs: a target that fills up for real (remount it larger to 'free space')."""
    from helpers import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tmpfs", "12m") as mount:
        yield mount


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """`prefect server start` on 127.0.0.1 with a private SQLite database."""
    url = os.environ["PREFECT_API_URL"]
    log = open(Path(_PREFECT_HOME) / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(_PREFECT_PORT),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start: see {log.name}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# The longest modules first (from a full run on 3 workers): with one module per worker (--dist loadfile,
# --no-loadscope-reorder) a long module started last would run alone at the end while the others idle.
SLOWEST_FIRST = (
    "test_libvirt.py", "test_hostile_target.py", "test_targets.py", "test_control_room.py",
    "test_hostile_run.py", "test_instant.py", "test_vsphere.py", "test_scale_out.py", "test_copy.py",
    "test_encryption.py", "test_policies.py", "test_hostile_guest.py", "test_files_backup.py",
    "test_backup_flow.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's order is kept

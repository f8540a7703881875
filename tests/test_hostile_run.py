"""Issue #13, part C: a killed run never blocks the next one or leaves anything behind; host-local state is
private; secrets stay out of child processes; a broken config file is one clear line.

Everything runs the real CLI against real QEMU VMs, on the session's `prefect server start` and (where the
reported case was) on the embedded server a CLI without PREFECT_API_URL starts for itself.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import hotvm, write_config
from qemu_helpers import DiskSpec, overlay_files, qemu_img, random_raw, start_qemu

MiB = 1 << 20
NEXT_RUN_S = 90  # the bound for the next backup after a kill
DEAD_LEASE_S = 45  # a dead holder's server lease would hold the slot 60-75 s: the next run must not wait


@pytest.fixture
def two_vms(tmp_path: Path):
    """web01 (128 MiB of random data: slow enough to be killed mid-export) and db01, one host, ONE slot."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    web = start_qemu(tmp_path / "a", [DiskSpec("data", random_raw(tmp_path / "a" / "web.raw", 256 * MiB,
                                                                   128 * MiB), format="raw")])  # fmt: skip
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b" / "db.qcow2"), "16M")
    db = start_qemu(tmp_path / "b", [DiskSpec("data", tmp_path / "b" / "db.qcow2")])
    db.qemu_io("data", "write -P 0x33 0 1M")
    config = write_config(
        tmp_path / "hotvm.yaml",
        {"web01": web.qmp_path, "db01": db.qmp_path},
        f"file://{tmp_path}/target",
        max_concurrent_backups=1,
    )
    try:
        yield config, web, db
    finally:
        web.stop()
        db.stop()


def start_backup(vm: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hotvm", "backup", vm, "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def kill_mid_export(proc: subprocess.Popen, target: Path, timeout: float = 180) -> None:
    """SIGKILL the CLI as soon as the first chunk of the export reached the target."""
    chunks = target / "chunks"
    deadline = time.monotonic() + timeout
    while not (chunks.exists() and any(p.is_file() for p in chunks.rglob("*"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def overlays_of(vm: str, env: dict[str, str]) -> list[str]:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "hotvm", "status", "--json"], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    row = next(r for r in json.loads(out.stdout) if r["vm"] == vm)
    return [o for d in row["disks"] for o in d["hotvm_overlays"]]


def processes_with(marker: bytes) -> list[int]:
    """pids whose environment holds `marker` (e.g. a private PREFECT_HOME=...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.timeout(600)
def test_killed_backup_frees_its_slot_and_vm_at_once(prefect_server, two_vms, tmp_path: Path) -> None:
    """A real Prefect server, limit 1: the slot of a SIGKILLed run is not held until its lease runs out,
    and the killed VM is back on its disk before the next run of it waits for a slot."""
    from hotvm.locks import host_slot_lock

    config, _web, _db = two_vms
    env = {**os.environ, "HOTVM_CONFIG": str(config), "HOTVM_LOCK_DIR": str(tmp_path / "locks")}
    kill_mid_export(start_backup("web01", env), tmp_path / "target")
    assert overlays_of("web01", env), "the kill left web01 on its overlay"

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hotvm", "backup", "db01", "--json"],
        env=env, capture_output=True, text=True, timeout=NEXT_RUN_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < DEAD_LEASE_S

    host = f"h-{tmp_path.name}"
    os.environ["HOTVM_LOCK_DIR"] = env["HOTVM_LOCK_DIR"]
    try:
        with host_slot_lock(host, 1):  # the host's only slot is busy: the next run of web01 must wait ...
            rerun = start_backup("web01", env)
            deadline = time.monotonic() + 60
            while overlays_of("web01", env):  # ... but puts web01 back on its disk first
                assert rerun.poll() is None, rerun.stderr.read().decode()
                assert time.monotonic() < deadline, "web01 was not reconciled before waiting for the slot"
                time.sleep(0.5)
            assert rerun.poll() is None, "the rerun did not wait for the slot"
            released = time.monotonic()
    finally:
        os.environ.pop("HOTVM_LOCK_DIR", None)
    out, err = rerun.communicate(timeout=NEXT_RUN_S)
    assert rerun.returncode == 0, err.decode()
    assert time.monotonic() - released < NEXT_RUN_S
    assert overlays_of("web01", env) == [] and overlays_of("db01", env) == []
    assert overlay_files(tmp_path) == []


@pytest.mark.timeout(600)
def test_killed_cli_on_the_embedded_server_leaves_nothing_behind(two_vms, tmp_path: Path) -> None:
    """The reported case: no PREFECT_API_URL, limit 1. The kill leaves no Prefect server behind (nor its
    leases), the next backups of the VM and of another VM on the host complete, the VM is back on its disk,
    and the server never saw the repository's key."""
    config, _web, _db = two_vms
    home = tmp_path / "prefect-home"
    home.mkdir()
    text = config.read_text().replace(f"url: file://{tmp_path}/target", f"url: file://{tmp_path}/target\n"
                                      "    encryption_key_env: T13_REPO_KEY")  # fmt: skip
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        HOTVM_CONFIG=str(config), HOTVM_LOCK_DIR=str(tmp_path / "locks"), PREFECT_HOME=str(home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", T13_REPO_KEY="t13 key never in a child",
    )  # fmt: skip
    marker = f"PREFECT_HOME={home}".encode()

    first = start_backup("web01", env)
    servers: list[int] = []
    secret_seen: list[bool] = []

    def watch_servers() -> None:  # note the embedded server and what its environment holds while it runs
        while first.poll() is None:
            for pid in processes_with(marker):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if b"uvicorn" in cmdline and pid not in servers:
                    servers.append(pid)
                    secret_seen.append(b"T13_REPO_KEY=" in environ)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_servers, daemon=True)
    watcher.start()
    kill_mid_export(first, tmp_path / "target")
    watcher.join(5)
    assert servers, "the CLI did not start an embedded server"
    assert secret_seen == [False] * len(servers), "the embedded server's environment held the key"
    deadline = time.monotonic() + 20
    while left := processes_with(marker):
        assert time.monotonic() < deadline, f"processes left behind by the killed CLI: {left}"
        time.sleep(0.2)

    for vm in ("db01", "web01"):
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "hotvm", "backup", vm, "--json"],
            env=env, capture_output=True, text=True, timeout=NEXT_RUN_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < NEXT_RUN_S
    assert "reconciled" in proc.stdout
    assert overlays_of("web01", env) == [] and overlays_of("db01", env) == []
    assert overlay_files(tmp_path) == []
    assert processes_with(marker) == []  # the clean exits stopped theirs too


def test_lock_dir_that_is_a_symlink_or_someone_elses_is_refused(prefect_server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hotvm.yaml", {"web01": tmp_path / "vm.qmp"}, f"file://{tmp_path}/t")
    real = tmp_path / "planted"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    env = {**os.environ, "HOTVM_LOCK_DIR": str(tmp_path / "link")}
    proc = run_cli(env, "backup", "web01", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert "lock directory" in proc.stderr and "symbolic link" in proc.stderr
    assert "Traceback" not in proc.stderr and list(real.iterdir()) == []

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    proc = run_cli({**env, "HOTVM_LOCK_DIR": str(foreign)}, "backup", "web01", "--config", str(config))
    assert proc.returncode == 2 and "belongs to uid 65534" in proc.stderr, proc.stderr
    assert list(foreign.iterdir()) == []


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hotvm", *args], env=env, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_overlays_get_their_image_mode(qemu, tmp_path: Path) -> None:
    from hotvm import backup

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "private.qcow2"), "16M")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "shared.raw"), "16M")
    os.chmod(tmp_path / "private.qcow2", 0o600)
    os.chmod(tmp_path / "shared.raw", 0o640)
    vm = qemu(
        [DiskSpec("p", tmp_path / "private.qcow2"), DiskSpec("s", tmp_path / "shared.raw", format="raw")]
    )
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/t")
    session = backup.open_session("web01", config)
    old = os.umask(0o022)  # what a default umask would have given an overlay: 0644
    try:
        backup.add_redo(session, ["p", "s"], "b1")
        backup.add_redo(session, ["p"], "b1")  # the second layer too
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in overlay_files(tmp_path)}
    assert len(modes) == 3
    expected = {name: 0o600 if name.startswith("private") else 0o640 for name in modes}
    assert modes == expected
    backup.reconcile(session)
    assert overlay_files(tmp_path) == []


def test_boot_check_qemu_gets_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key a config names reaches no child: read it from the boot-check QEMU's /proc/<pid>/environ."""
    from hotvm.bootcheck import boot_disks
    from hotvm.config import BootCheckSpec
    from hotvm.config_file import load_config

    config = write_config(tmp_path / "hotvm.yaml", {"web01": tmp_path / "vm.qmp"}, f"file://{tmp_path}/t")
    config.write_text(config.read_text() + "    encryption_key_env: T13_BOOT_KEY\n    password_env: T13_PW\n")
    load_config(config)
    monkeypatch.setenv("T13_BOOT_KEY", "secret-key")
    monkeypatch.setenv("T13_PW", "secret-password")
    monkeypatch.setenv("T13_HARMLESS", "kept")
    disk = tmp_path / "blank.raw"
    qemu_img("create", "-q", "-f", "raw", str(disk), "1M")
    serial = tmp_path / "serial.log"
    spec = BootCheckSpec(ready_pattern="never printed", timeout_s=20, memory_mb=32)
    booting = threading.Thread(
        target=boot_disks, args=(spec, [(str(disk), "raw")], serial, "tcg"), daemon=True
    )
    booting.start()
    environ = None
    deadline = time.monotonic() + 15
    while environ is None and time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and str(serial).encode() in (entry / "cmdline").read_bytes():
                    environ = (entry / "environ").read_bytes().split(b"\0")
                    os.kill(int(entry.name), signal.SIGKILL)  # done looking: end the boot check early
                    break
            except OSError:
                continue
        time.sleep(0.05)
    booting.join(30)
    assert environ is not None, "the boot-check QEMU was not found"
    assert b"T13_HARMLESS=kept" in environ
    assert not [v for v in environ if v.startswith((b"T13_BOOT_KEY=", b"T13_PW="))]


BAD_CONFIGS = {
    "non-utf8": (b"hosts:\n  - name: h\xe9\n", "hotvm.yaml:2: not UTF-8"),
    "duplicate": (
        b"hosts:\n  - name: h\n    vms: []\ntargets:\n  - name: t\n    url: file:///tmp/x\n"
        b"    url: file:///tmp/y\n",
        "hotvm.yaml:7: duplicate key 'url' (first given at line 6)",
    ),
    "target-url": (
        b"hosts: [{name: h}]\ntargets: [{name: t, url: 'sftp://backup:s3cr3t@nas/srv'}]\n",
        "targets.0.url: holds a password",
    ),
    "endpoint": (
        b"hosts: [{name: h}]\ntargets: [{name: t, url: 's3://b/p', endpoint_url: 'http://ak:s3cr3t@127.0.0.1:9'}]\n",
        "targets.0.endpoint_url: holds a password",
    ),
    "libvirt": (
        b"hosts: [{name: h, driver: libvirt, uri: 'qemu+ssh://root:s3cr3t@kvm1/system'}]\n"
        b"targets: [{name: t, url: /tmp/x}]\n",
        "hosts.0.uri: holds a password",
    ),
    "vsphere": (
        b"hosts: [{name: h, driver: vsphere, url: 'https://admin:s3cr3t@vc/sdk', username: admin,"
        b" password_env: VC_PW}]\ntargets: [{name: t, url: /tmp/x}]\n",
        "hosts.0.url: holds a password",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_broken_config_is_one_line(case: str, tmp_path: Path) -> None:
    content, expected = BAD_CONFIGS[case]
    path = tmp_path / "hotvm.yaml"
    path.write_bytes(content)
    proc = hotvm("list", "--config", str(path), check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "s3cr3t" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # the error and its fix

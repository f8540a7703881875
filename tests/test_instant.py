"""Instant restore (docs/instant.md): the demo guest boots from its backup set while its disk streams home.

One hot backup of the demo guest per module (a 128 MiB disk: the guest's ring in the first MiB, 40 MiB of
random data behind it), then real QEMU, real nbdkit, the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import hotvm
from test_encryption import KEY_ENV, PASSPHRASE, backup

from hotvm.guest.disk import RING_BYTES, verify_ring
from hotvm.hypervisors.qmp import Monitor
from hotvm.instant.chunks import READ_AHEAD

MiB = 1 << 20
DATA_AT, DATA_LEN = 4 * MiB, 40 * MiB
_BEAT = re.compile(r"HOTVM-HEARTBEAT seq=(\d+)")

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def backed_up(prefect_server, tmp_path_factory) -> dict:
    """A hot backup of the running demo guest, its disk partly filled with random data beforehand."""
    from flows.backup_vm import backup_vm
    from hotvm import guest

    tmp = tmp_path_factory.mktemp("instant")
    state = tmp / "vms"
    guest.create_vm("ig", data_size="128M", fmt="qcow2", state_dir=state)
    noise = tmp / "noise.bin"
    noise.write_bytes(os.urandom(DATA_LEN))
    image = state / "ig" / "data.qcow2"
    write = f"write -s {noise} {DATA_AT} {DATA_LEN}"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", write, str(image)], check=True, capture_output=True)
    config = tmp / "hotvm.yaml"
    try:
        guest.start_vm("ig", state_dir=state)
        guest.wait_ready("ig", timeout=180, state_dir=state)
        entry = guest.vm_config_entry("ig", state_dir=state) | {"rto": "10m"}
        config.write_text(yaml.safe_dump({
            "hosts": [{"name": "h-ig", "vms": [entry]}],
            "targets": [{"name": "nas", "url": f"file://{tmp}/target"}],
        }))  # fmt: skip
        result = backup_vm(vm="ig", config=str(config))
    finally:
        guest.stop_vm("ig", state_dir=state)
    full = tmp / "full"
    hotvm("restore", "ig", "--to", str(full), "--format", "raw", "--config", str(config))
    return {"config": config, "tmp": tmp, "backup_id": result["backup_id"], "full": full / "data.raw",
            "backup_seq": verify_ring(full / "data.raw").last_seq}  # fmt: skip


@pytest.fixture(autouse=True)
def private_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTVM_INSTANT_INDEX", str(tmp_path / "index"))


@pytest.fixture
def cleanup():
    """Stops every VM / storage daemon / export a test started (by the pids its restores recorded)."""
    dirs: list[Path] = []
    yield dirs.append
    for run in dirs:
        for pidfile in ("qemu.pid", "nbdkit.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((run / pidfile).read_text()), signal.SIGKILL)


def _instant(config: Path, to: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return hotvm("restore", "ig", "--instant", "--to", str(to), "--config", str(config), "--json", *args,
                 check=check)  # fmt: skip


def _jobs(qmp: str) -> list[dict]:
    mon = Monitor(Path(qmp), "ig")
    try:
        return mon.cmd("query-jobs")
    finally:
        mon.close()


def _beats(serial: Path) -> list[int]:
    return [int(s) for s in _BEAT.findall(serial.read_text(errors="replace"))] if serial.exists() else []


def _wait(predicate, timeout: float = 120, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _raw(image: str, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, str(out)], check=True)
    return out.read_bytes()


def test_guest_runs_before_the_stream_ends_and_its_disk_ends_local(backed_up, tmp_path: Path, cleanup):  # noqa: ANN201
    to = tmp_path / "r"
    cleanup(to / "run")
    first = json.loads(_instant(backed_up["config"], to, "--start", "--speed", str(4 * MiB)).stdout)
    assert first["running"] and first["status"] == "streaming" and first["depends_on_repository"]
    assert Path(first["qmp"]).is_socket() and first["serial_log"] == str(to / "serial.log")
    [disk] = first["disks"]
    assert disk["device"] == "data" and disk["path"] == str(to / "data.qcow2")

    # the guest is up and writing (heartbeats are fsync'ed ring records) while the stream is still going
    _wait(lambda: len(_beats(to / "serial.log")) >= 3, what="heartbeats")
    [job] = _jobs(first["qmp"])
    assert job["type"] == "stream" and job["status"] == "running"
    assert job["current-progress"] < job["total-progress"]
    rows = json.loads(hotvm("status", "--config", str(backed_up["config"]), "--json").stdout)
    [row] = [r for r in rows if r["host"] == "instant"]
    assert row["instant"]["depends_on_repository"] and "depends on repository 'nas'" in row["state"]
    assert (to / "instant.json").stat().st_mode & 0o777 == (to / "data.qcow2").stat().st_mode & 0o777 == 0o600
    assert (to / "run").stat().st_mode & 0o777 == 0o700

    # the same command with --wait resumes at full speed and returns once the disk is local
    done = json.loads(_instant(backed_up["config"], to, "--start", "--wait").stdout)
    assert done["status"] == "complete" and not done["depends_on_repository"] and done["running"]
    mon = Monitor(Path(done["qmp"]), "ig")
    try:
        drivers = {n["drv"] for n in mon.cmd("query-named-block-nodes", {"flat": True})}
        mon.cmd("quit")
    finally:
        mon.close()
    assert "nbd" not in drivers and drivers <= {"qcow2", "file"}
    _wait(lambda: not _proc_name(done["pid"]), what="VM exit")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", disk["path"]],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info
    assert not (to / "run" / "nbd.sock").exists()

    # the local image = the backup, plus the guest's writes (its ring, after the backup's last record)
    local, full = _raw(disk["path"], tmp_path / "local.raw"), backed_up["full"].read_bytes()
    assert local[RING_BYTES:] == full[RING_BYTES:]
    ring = verify_ring(local[:RING_BYTES])
    assert ring.consistent, ring.problems
    assert ring.last_seq >= max(_beats(to / "serial.log")) > backed_up["backup_seq"]
    fetched = (to / "run" / "fetches.log").read_text().split()[1::2]
    assert len(fetched) == len(set(fetched))  # every chunk read from the repository once


def _proc_name(pid: int | None) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def test_killed_stream_and_stopped_vm_resume_without_losing_writes(backed_up, tmp_path: Path, cleanup):  # noqa: ANN201
    to = tmp_path / "r"
    cleanup(to / "run")
    args = [sys.executable, "-m", "hotvm", "restore", "ig", "--instant", "--to", str(to), "--start", "--wait",
            "--speed", str(4 * MiB), "--config", str(backed_up["config"]), "--json"]  # fmt: skip
    waiter = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: len(_beats(to / "serial.log")) >= 2, what="heartbeats")
    _wait(lambda: any(j["current-progress"] > 8 * MiB for j in _jobs(str(to / "run" / "qmp-user.sock"))),
          what="stream progress")  # fmt: skip
    # the stream's processes die: the CLI waiting for it and the export it reads from
    waiter.send_signal(signal.SIGKILL)
    waiter.wait()
    os.kill(int((to / "run" / "nbdkit.pid").read_text()), signal.SIGKILL)
    before = (to / "run" / "fetches.log").read_text().split()[1::2]
    # ... and the user stops the VM mid-stream
    vm_pid = int((to / "run" / "qemu.pid").read_text())
    mon = Monitor(to / "run" / "qmp-user.sock", "ig")
    try:
        mon.cmd("quit")
    finally:
        mon.close()
    _wait(lambda: not _proc_name(vm_pid), what="VM exit", timeout=30)
    last_beat = max(_beats(to / "serial.log"))
    rows = json.loads(hotvm("status", "--config", str(backed_up["config"]), "--json").stdout)
    [row] = [r for r in rows if r["host"] == "instant"]
    assert row["state"].startswith("stopped; depends on repository 'nas'"), row["state"]

    done = json.loads(_instant(backed_up["config"], to, "--start", "--wait").stdout)
    assert done["status"] == "complete" and done["running"] and not done["depends_on_repository"]
    fetched = (to / "run" / "fetches.log").read_text().split()[1::2]
    again = fetched[len(before) :]
    assert len(again) < len(set(fetched))  # resumed: what was already local was not read again
    assert len(set(before) & set(again)) <= READ_AHEAD + 1  # only the chunks in flight at the kill
    assert len(again) == len(set(again))
    # nothing the guest wrote was lost: the restarted guest finds its newest record on the disk
    ready = re.compile(r"HOTVM-READY last=(\d+)")
    _wait(lambda: ready.search((to / "serial.log").read_text()), what="second boot")
    assert int(ready.search((to / "serial.log").read_text()).group(1)) >= last_beat


def test_damaged_chunk_is_named_and_the_guest_read_fails(backed_up, tmp_path: Path, cleanup) -> None:
    target = tmp_path / "target"
    shutil.copytree(backed_up["tmp"] / "target", target)
    config = tmp_path / "hotvm.yaml"
    config.write_text(backed_up["config"].read_text().replace(str(backed_up["tmp"] / "target"), str(target)))
    manifest = json.loads((target / "vms" / "ig" / backed_up["backup_id"] / "manifest.json").read_text())
    index, digest = manifest["disks"][0]["chunks"][0]  # the ring: the first thing the guest reads
    [chunk] = list((target / "chunks").rglob(digest))
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk.write_bytes(bytes(blob))

    to = tmp_path / "r"
    cleanup(to / "run")
    proc = _instant(config, to, "--start", "--wait", check=False)
    assert proc.returncode == 2
    assert f"chunk {index} of disk 'data' does not match its checksum" in proc.stderr
    assert "rerun 'hotvm restore ig --instant" in proc.stderr
    _wait(lambda: "HOTVM-READY" in (to / "serial.log").read_text(), what="guest init")
    console = (to / "serial.log").read_text()
    assert "I/O error, dev vda" in console  # the guest's read failed ...
    assert "HOTVM-READY last=0" in console  # ... and it found no record: it never saw wrong data
    state = json.loads((to / "instant.json").read_text())
    assert state["status"] == "stream-failed" and digest[:16] in state["error"]


def _random_image(path: Path, size: int, data: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(os.urandom(data))
    return path


def test_encrypted_ftp_target_waits_out_an_outage_without_starting_the_vm(
    tmp_path: Path, cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No VM (qemu-storage-daemon streams) from an encrypted repository on FTP, through the local chunk
    cache; no secret in the export's command line or environment; the FTP server goes away mid-stream and
    comes back: the stream waits (docs/instant.md) and ends equal to the backed-up image."""
    from servers import FtpServer

    from hotvm.config import TargetConfig
    from hotvm.credentials import encryption_key
    from hotvm.formats.repository import Repository
    from targets import open_target

    server = FtpServer().start()
    try:
        monkeypatch.setenv(KEY_ENV, PASSPHRASE)
        monkeypatch.setenv("HOTVM_TEST_FTP_PASSWORD", server.password)
        url = f"ftp://{server.user}@127.0.0.1:{server.port}/backups"
        target_cfg = TargetConfig(name="ftp", url=url, password_env="HOTVM_TEST_FTP_PASSWORD",
                                  encryption_key_env=KEY_ENV)  # fmt: skip
        image = _random_image(tmp_path / "disk.raw", 24 * MiB, 12 * MiB)
        target = open_target(target_cfg)
        try:
            backup(Repository(target, encryption_key(target_cfg)), image)
        finally:
            target.close()
        config = tmp_path / "hotvm.yaml"
        entry = target_cfg.model_dump(mode="json", exclude_defaults=True)
        config.write_text(yaml.safe_dump({"hosts": [{"name": "h1", "vms": []}], "targets": [entry]}))
        to = tmp_path / "r"
        cleanup(to / "run")
        cmd = ["restore", "secret-vm", "--instant", "--to", str(to), "--config", str(config), "--json"]
        first = json.loads(hotvm(*cmd, "--speed", str(MiB)).stdout)
        assert first["runner"] == "storage-daemon" and first["serial_log"] is None and first["running"]
        pid = int((to / "run" / "nbdkit.pid").read_text())
        secrets = [PASSPHRASE.encode(), server.password.encode()]
        for what in ("cmdline", "environ"):
            seen = Path(f"/proc/{pid}/{what}").read_bytes()
            assert not any(s in seen for s in secrets), what
        cache = to / ".chunk-cache"
        _wait(lambda: len(list(cache.iterdir())) >= 2, what="cached chunks")
        assert cache.stat().st_mode & 0o777 == 0o700
        plain = image.read_bytes()[:64]  # random data: zstd keeps it as is, so only encryption hides it
        assert not any(plain in p.read_bytes() for p in cache.iterdir())  # cached as stored: encrypted

        server.stop()  # the target goes away mid-stream ...
        problems = to / "run" / "problems.jsonl"
        _wait(lambda: problems.exists() and "unreachable" in problems.read_text(), 45, "a fetch to fail")
        time.sleep(2)  # watched, well inside the 60 s a fetch waits for an unreachable target
        [job] = _jobs(first["qmp"])
        assert job["status"] == "running" and job["current-progress"] < 24 * MiB  # ... the stream waits
        server.start()  # ... and it comes back

        done = json.loads(hotvm(*cmd, "--wait").stdout)
        assert done["status"] == "complete" and not done["running"] and not cache.exists()
        assert _raw(done["disks"][0]["path"], tmp_path / "local.raw") == image.read_bytes()
    finally:
        server.close()


def test_full_disk_fails_the_stream_and_a_rerun_with_space_resumes(small_tmpfs: Path, tmp_path: Path,
                                                                     cleanup) -> None:  # fmt: skip
    """The overlay's file system fills up (a 12 MiB tmpfs, 16 MiB of data): the stream stops saying so,
    nothing is lost, and after the space is there the same command finishes it."""
    from hotvm.config import TargetConfig
    from hotvm.formats.repository import Repository
    from targets import open_target

    image = _random_image(tmp_path / "disk.raw", 32 * MiB, 16 * MiB)
    target_cfg = TargetConfig(name="nas", url=f"file://{tmp_path}/target")
    backup(Repository(open_target(target_cfg)), image)
    config = tmp_path / "hotvm.yaml"
    entry = target_cfg.model_dump(mode="json", exclude_defaults=True)
    config.write_text(yaml.safe_dump({"hosts": [{"name": "h1", "vms": []}], "targets": [entry]}))
    to = small_tmpfs / "r"
    cleanup(to / "run")
    cmd = ["restore", "secret-vm", "--instant", "--to", str(to), "--config", str(config), "--json"]
    proc = hotvm(*cmd, "--wait", check=False)
    assert proc.returncode == 2 and "No space left on device" in proc.stderr, proc.stderr
    assert json.loads((to / "instant.json").read_text())["vm"] == "secret-vm"  # whole, even on a full disk
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    done = json.loads(hotvm(*cmd, "--wait").stdout)
    assert done["status"] == "complete"
    assert _raw(done["disks"][0]["path"], tmp_path / "local.raw") == image.read_bytes()


def test_the_flow_streams_as_a_task_with_progress(backed_up, tmp_path: Path, cleanup) -> None:
    from prefect.client.orchestration import get_client

    from flows.instant_restore import instant_restore

    to = tmp_path / "r"
    cleanup(to / "run")
    state = instant_restore(vm="ig", to=str(to), start=False, wait=True, config=str(backed_up["config"]),
                            return_state=True)  # fmt: skip
    out = state.result()
    assert out["status"] == "complete" and not out["running"] and not out["depends_on_repository"]
    local = _raw(out["disks"][0]["path"], tmp_path / "local.raw")
    assert local == backed_up["full"].read_bytes()  # no VM ran: exactly the backup
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
        names = {t.name.split("-")[0] for t in runs if t.flow_run_id == state.state_details.flow_run_id}
        artifacts = client.read_artifacts()
    assert {"prepare_overlays", "expose_backup", "start_vm", "start_stream", "stream"} <= names
    assert any(a.type == "progress" and a.data == 100.0 for a in artifacts)


def test_verify_boot_boots_from_the_set_and_plan_records_both_times(backed_up) -> None:
    """`hotvm verify --boot`: the guest boots from the set itself (docs/instant.md); the set and the DR plan
    record the boot time and the time to ready."""
    from hotvm.config_file import load_config
    from hotvm.plan import check_plan, gather_evidence, vm_plans

    proc = hotvm("verify", "ig", "--boot", "--config", str(backed_up["config"]), "--json")
    [result] = json.loads(proc.stdout)
    assert result["verified"] and result["mode"] == "instant-boot", result["problems"]
    assert result["boot_check"]["ok"] and 0 < result["boot_check"]["seconds"] < result["seconds_to_ready"]
    assert result["stream_seconds"] > 0 and result["scratch"] is None
    tests = backed_up["tmp"] / "target" / "vms" / "ig" / backed_up["backup_id"] / "restore-tests"
    records = [json.loads(f.read_text()) for f in tests.glob("*.json")]  # the set's own record of it
    assert any(r["verified"] and (r.get("boot_check") or {}).get("seconds") == result["boot_check"]["seconds"]
               for r in records), records  # fmt: skip
    cfg = load_config(backed_up["config"])
    measured = gather_evidence(cfg, vm_plans(cfg))["ig"].restore_test
    assert measured["mode"] == "instant-boot" and measured["seconds"] == result["seconds_to_ready"]
    assert measured["stream_seconds"] == result["stream_seconds"]
    assert not [v for v in check_plan(cfg) if v.vm == "ig" and v.check == "rto"]  # RTO 10m is met

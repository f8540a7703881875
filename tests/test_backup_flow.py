"""End to end: hot backups of a real running QEMU through the Prefect flows and the CLI, then restores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import KiB64, SequentialWriter, hotvm, hotvm_json, write_config, written_prefix
from qemu_helpers import DiskSpec, overlay_files, qemu_img, random_raw, start_qemu

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def test_hot_backup_while_guest_writes_then_restore(prefect_server, qemu, tmp_path: Path) -> None:
    from flows.backup_vm import backup_vm
    from flows.restore_vm import restore_vm

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "data.qcow2"), "64M")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "sys.raw"), "32M")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "iso.raw"), "8M")
    vm = qemu(
        [
            DiskSpec("data", tmp_path / "data.qcow2"),
            DiskSpec("sys", tmp_path / "sys.raw", format="raw", bus="ide", style="drive"),
            DiskSpec("iso", tmp_path / "iso.raw", format="raw", read_only=True),
        ]
    )
    writer = SequentialWriter(vm, "data", limit=512)
    for n in range(20):
        writer.write_block(n)
    writer.next = 20
    vm.qemu_io("sys", f"write -P 0x5a 0 {MiB}")
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")

    writer.start()  # the guest keeps writing through the whole backup
    result = backup_vm(vm="web01", config=str(config))
    written = writer.stop()

    assert {d["device"] for d in result["disks"]} == {"data", "sys"}
    assert any("skipped iso" in w and "read-only" in w for w in result["warnings"])
    assert result["pivot_stall_ms"] is not None
    assert [s["name"] for s in result["steps"] if s["device"] == "data"] == [
        "export",
        "add_redo",
        "commit_level1",
        "commit_final",
    ]
    assert (tmp_path / "target" / "vms" / "web01" / result["backup_id"] / "manifest.json").exists()

    restored = restore_vm(vm="web01", to=str(tmp_path / "restored"), fmt="raw", config=str(config))
    by_device = {d["device"]: Path(d["path"]) for d in restored["disks"]}
    frozen = written_prefix(by_device["data"], "raw", 512)
    assert 20 <= frozen <= written  # a point-in-time copy: a clean prefix of the guest's writes
    assert by_device["sys"].read_bytes()[:MiB] == b"\x5a" * MiB
    assert json.loads((tmp_path / "restored" / "config" / "vm-description.json").read_text())

    vm.stop()  # the live disk kept every write, and runs on its original file again
    assert written_prefix(tmp_path / "data.qcow2", "qcow2", 512) == written
    assert "backing file" not in qemu_img("info", str(tmp_path / "data.qcow2"))
    assert overlay_files(tmp_path) == []


def test_killed_backup_is_reconciled_and_resumed(prefect_server, qemu, tmp_path: Path) -> None:
    disk = random_raw(tmp_path / "data.raw", 512 * MiB, 384 * MiB)
    vm = qemu([DiskSpec("data", disk, format="raw")])
    vm.qemu_io("data", f"write -P 0x11 {400 * MiB} {MiB}")
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")
    env = {**os.environ, "HOTVM_CONFIG": str(config)}
    os.environ["HOTVM_CONFIG"] = str(config)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotvm", "backup", "web01", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        chunks = tmp_path / "target" / "chunks"
        deadline = time.monotonic() + 120
        while not (chunks.exists() and any(chunks.rglob("*"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-export: the VM is left on its overlay
        proc.wait()

        status = hotvm_json("status")
        assert status[0]["disks"][0]["hotvm_overlays"], "status must show the overlay left behind"
        listed = hotvm_json("list")
        assert [e["complete"] for e in listed] == [False]

        result = hotvm_json("backup", "web01")
        assert result["backup_id"] == listed[0]["backup_id"]  # the unfinished set was resumed
        assert any(w.startswith("reconciled") for w in result["warnings"])
        assert result["disks"][0]["bytes_new"] < result["disks"][0]["bytes_read"]  # uploaded chunks reused
        assert hotvm_json("status")[0]["disks"][0]["hotvm_overlays"] == []
        assert [e["complete"] for e in hotvm_json("list")] == [True]
    finally:
        os.environ.pop("HOTVM_CONFIG", None)
    vm.stop()
    assert "backing file" not in qemu_img("info", "-f", "raw", str(disk))
    assert overlay_files(tmp_path) == []


def test_full_target_fails_cleanly_and_retry_of_the_flow_run_resumes(
    prefect_server, qemu, small_tmpfs: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.backup_vm import backup_vm

    a = random_raw(tmp_path / "a.raw", 16 * MiB, 4 * MiB)
    b = random_raw(tmp_path / "b.raw", 32 * MiB, 24 * MiB)
    vm = qemu([DiskSpec("a", a, format="raw"), DiskSpec("b", b, format="raw")])
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{small_tmpfs}/repo")

    state = backup_vm(vm="web01", config=str(config), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="target 'nas' is full"):
        state.result()
    from hotvm.backup import open_session

    with open_session("web01", config).driver() as driver:
        assert all(not d.hotvm_overlays for d in driver.list_disks()), "rolled back: no VM left on an overlay"
    assert overlay_files(tmp_path) == []

    subprocess.run(["mount", "-o", "remount,size=96m", str(small_tmpfs)], check=True)
    flow_run_id = state.state_details.flow_run_id
    retry = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "flow-run",
            "retry",
            str(flow_run_id),
            "--entrypoint",
            "flows/backup_vm.py:backup_vm",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    exports = sorted((r.name, r.state.type.value) for r in runs if r.name.startswith("export "))
    assert exports.count(("export a", "COMPLETED")) == 1  # disk a was not read again on the retry
    assert [n for n, _ in exports].count("export b") == 2  # b failed, then completed
    sets = hotvm_json("list", "--config", str(config))
    assert [s["complete"] for s in sets] == [True] and sorted(sets[0]["disks"]) == ["a", "b"]

    out = tmp_path / "restored"
    hotvm("restore", "web01", "--to", str(out), "--format", "raw", "--config", str(config))
    vm.stop()
    assert (out / "a.raw").read_bytes() == a.read_bytes()
    assert (out / "b.raw").read_bytes() == b.read_bytes()


def test_bad_inputs_get_one_clear_message(prefect_server, tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(
        "hosts:\n  - name: h\n    vms: [{name: a, qmp: /x, qmpp: 1}]\n"
        "targets: [{name: t, url: file:///tmp}]\n"
    )
    proc = hotvm("backup", "a", "--config", str(bad_key), check=False)
    assert proc.returncode == 2
    assert "hosts.0.vms.0.qmpp: unknown key" in proc.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("hosts:\n  - name: h\n   vms: []\n")
    proc = hotvm("list", "--config", str(broken), check=False)
    assert proc.returncode == 2 and "not valid YAML at line 3" in proc.stderr

    good = write_config(tmp_path / "hotvm.yaml", {"web01": tmp_path / "nope.qmp"}, f"file://{tmp_path}/t")
    proc = hotvm("backup", "db01", "--config", str(good), check=False)
    assert proc.returncode == 2 and "unknown VM 'db01' (configured: web01)" in proc.stderr

    proc = hotvm("backup", "web01", "--config", str(good), check=False)
    assert proc.returncode == 2
    assert "nope.qmp" in proc.stderr and "-qmp unix:" in proc.stderr
    assert "Traceback" not in proc.stderr

    from hotvm.locks import vm_lock

    with vm_lock(f"h-{tmp_path.name}", "web01"):  # as if another backup of web01 were running
        proc = hotvm("backup", "web01", "--config", str(good), check=False)
    assert proc.returncode == 2
    assert "a backup of VM 'web01'" in proc.stderr and "already running" in proc.stderr

    proc = hotvm("restore", "web01", "--to", str(tmp_path / "r"), "--config", str(good), check=False)
    assert proc.returncode == 2 and "no complete backup of VM 'web01'" in proc.stderr


def test_backup_leaves_no_state_in_memory_between_steps(qemu, tmp_path: Path) -> None:
    """The plain-Python API (no Prefect) is the same steps the tasks call; each reopens what it needs."""
    from hotvm import backup

    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "16M")
    vm = qemu([DiskSpec("d", tmp_path / "d.qcow2")])
    vm.qemu_io("d", f"write -P 0x42 0 {KiB64}")
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/t")
    session = backup.open_session("web01", config)
    plan = backup.plan_disks(session, None, "20260101T000000Z-b1")
    frozen = backup.add_redo(session, [d.device for d in plan.todo], "20260101T000000Z-b1")
    record = backup.export_disk(session, None, "20260101T000000Z-b1", frozen[0])
    journaled = backup.plan_disks(session, None, "20260101T000000Z-b1").done
    assert journaled == [record]  # journaled: a rerun skips it
    backup.add_redo(session, ["d"], "20260101T000000Z-b1")
    backup.commit(session, "d", 1)
    assert backup.commit(session, "d", "final").stall_ms is not None
    assert overlay_files(tmp_path) == []


def test_backup_host_never_runs_more_than_the_host_limit(prefect_server, tmp_path: Path) -> None:
    from flows.backup_host import backup_host
    from hotvm.config import TargetConfig
    from hotvm.formats.repository import Repository
    from targets import open_target

    vms = {}
    try:
        for name in ("a", "b", "c"):
            d = tmp_path / name
            d.mkdir()
            random_raw(d / "disk.raw", 64 * MiB, 24 * MiB)
            vms[name] = start_qemu(d, [DiskSpec("disk", d / "disk.raw", format="raw")])
        config = write_config(
            tmp_path / "hotvm.yaml",
            {n: v.qmp_path for n, v in vms.items()},
            f"file://{tmp_path}/target",
            max_concurrent_backups=1,
        )
        results = backup_host(host=f"h-{tmp_path.name}", config=str(config))
    finally:
        for vm in vms.values():
            vm.stop()
    assert sorted(r["vm"] for r in results if r["ok"]) == ["a", "b", "c"]
    repo = Repository(open_target(TargetConfig(name="nas", url=f"file://{tmp_path}/target")))
    spans = sorted((e.manifest.started_at, e.manifest.completed_at) for e in repo.list_sets() if e.manifest)
    assert len(spans) == 3
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False)), (
        "max_concurrent_backups=1: backups of one host must not overlap"
    )


def test_a_chunk_lost_before_the_manifest_makes_the_rerun_export_the_disk_again(qemu, tmp_path: Path) -> None:
    from hotvm import backup
    from hotvm.errors import BackupSetError
    from hotvm.formats.manifest import Manifest, utcnow

    disk = random_raw(tmp_path / "d.raw", 16 * MiB, 4 * MiB)
    vm = qemu([DiskSpec("d", disk, format="raw")])
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/t")
    session = backup.open_session("web01", config)
    frozen = backup.add_redo(session, ["d"], "20260101T000000Z-b1")
    record = backup.export_disk(session, None, "20260101T000000Z-b1", frozen[0])
    backup.add_redo(session, ["d"], "20260101T000000Z-b1")
    backup.commit(session, "d", 1)
    backup.commit(session, "d", "final")
    next((tmp_path / "t" / "chunks").rglob(record.chunks[0][1])).unlink()  # e.g. a racing prune
    manifest = Manifest(backup_id="20260101T000000Z-b1", vm="web01", host="h", driver="qemu",
                        started_at=utcnow(), completed_at=utcnow(), disks=[record])
    with pytest.raises(BackupSetError, match="disk\\(s\\) d of web01/20260101T000000Z-b1 are missing"):
        backup.transfer(session, None, manifest)
    assert [d.device for d in backup.plan_disks(session, None, "20260101T000000Z-b1").todo] == ["d"]

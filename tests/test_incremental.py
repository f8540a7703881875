"""Incremental-forever image backups with QEMU dirty bitmaps, against a real QEMU (TCG, no guest OS).

Guest-like writes are HMP qemu-io with known patterns, mirrored into a bytearray model of each disk, so a
restore of every point can be compared with what the disk held at that point's freeze.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import write_config
from qemu_helpers import DiskSpec, RunningQemu, qemu_img, start_qemu

from hotvm import backup
from hotvm.formats.manifest import DiskRecord, Manifest
from hotvm.formats.patchplan import MAX_PATCHES_PER_CHUNK
from hotvm.restore import restore_one_disk

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86"),
    pytest.mark.timeout(120),
]

MiB, K64 = 1 << 20, 64 << 10
CHUNK = 4 * MiB
SIZE = 64 * MiB


class Disk:
    """A test disk and the bytes it should hold."""

    def __init__(self, vm: RunningQemu, device: str, size: int = SIZE) -> None:
        self.vm, self.device, self.model = vm, device, bytearray(size)

    def write(self, offset: int, length: int, pat: int) -> None:
        self.vm.qemu_io(self.device, f"write -P {pat:#x} {offset} {length}")
        self.model[offset : offset + length] = bytes([pat]) * length

    def snapshot(self) -> bytes:
        return bytes(self.model)


def make_images(tmp_path: Path) -> tuple[Path, Path]:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "data.qcow2"), str(SIZE))
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "sys.raw"), str(SIZE))
    return tmp_path / "data.qcow2", tmp_path / "sys.raw"


def specs(data: Path, sys_: Path) -> list[DiskSpec]:
    return [DiskSpec("data", data), DiskSpec("sys", sys_, format="raw", bus="ide", style="drive")]


def bitmaps(vm: RunningQemu, filename: Path) -> dict[str, dict]:
    """Dirty bitmaps on the format node of `filename`, by name."""
    for node in vm.qmp("query-named-block-nodes", flat=True):  # type: ignore[union-attr]
        if node["file"] == str(filename) and node["drv"] != "file":
            return {b["name"]: b for b in node.get("dirty-bitmaps", [])}
    raise AssertionError(f"no node for {filename}")


def run_backup(
    session: backup.Session, backup_id: str, during: Callable[[str], None] | None = None
) -> tuple[Manifest, list[str]]:
    """The flow's steps (flows/backup_vm.py) as plain calls, with a hook to write while frozen."""
    backup.reconcile(session)
    plan = backup.plan_disks(session, None, backup_id)
    records = {r.device: r for r in plan.done}
    warnings = []
    frozen = backup.add_redo(session, [d.device for d in plan.todo], backup_id, track_changes=True)
    if during:
        during("frozen")
    for disk in frozen:
        baseline = plan.baselines.get(disk.device)
        record = backup.export_disk(session, None, backup_id, disk, baseline=baseline)
        if warning := backup.incremental_warning(record, baseline):
            warnings.append(warning)
        backup.add_redo(session, [disk.device], backup_id)
        if during:
            during(f"layer2:{disk.device}")
        backup.commit(session, disk.device, 1)
        backup.commit(session, disk.device, "final")
        records[disk.device] = record
    now = backup.utcnow()
    manifest = Manifest(
        backup_id=backup_id, vm=session.vm.name, host=session.host.name, driver="qemu", started_at=now,
        completed_at=now, disks=list(records.values()), warnings=warnings,
    )  # fmt: skip
    backup.transfer(session, None, manifest)
    backup.drop_bitmaps(session, backup.superseded_bitmaps(plan.baselines, records))
    return manifest, warnings


def assert_restores(config: Path, manifest: Manifest, expected: dict[str, bytes], dest: Path) -> None:
    for device, data in expected.items():
        restored = restore_one_disk(config, None, manifest, device, dest / manifest.backup_id, "raw")
        assert Path(restored.path).read_bytes() == data, f"{device} of {manifest.backup_id} differs"


def test_incremental_reads_only_changed_chunks_and_every_point_restores(qemu, tmp_path: Path) -> None:
    data_img, sys_img = make_images(tmp_path)
    vm = qemu(specs(data_img, sys_img))
    data, sys_ = Disk(vm, "data"), Disk(vm, "sys")
    for i in range(0, 16, 2):  # half the chunks hold data
        data.write(i * CHUNK + 4096 * i, 256 * 1024, 0x10 + i)
        sys_.write(i * CHUNK, 128 * 1024, 0x40 + i)
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")
    session = backup.open_session("web01", config)

    b1, warnings = run_backup(session, "20240101T000000Z-0001")
    points = {b1.backup_id: {"data": data.snapshot(), "sys": sys_.snapshot()}}
    assert warnings == []  # a first backup is full without complaint
    for d in b1.disks:
        assert d.export_mode == "full (no earlier backup of this disk on the target)"
        assert d.bitmap == "hotvm-20240101T000000Z-0001" and d.incremental_from is None
    assert bitmaps(vm, data_img)["hotvm-20240101T000000Z-0001"]["persistent"] is True
    assert bitmaps(vm, sys_img)["hotvm-20240101T000000Z-0001"]["persistent"] is False

    # between backups: two chunks of data (one write spans a chunk boundary: chunks 5 and 6), one of sys
    data.write(3 * CHUNK + 64 * 1024, 64 * 1024, 0xA1)
    data.write(6 * CHUNK - 32 * 1024, 64 * 1024, 0xA2)
    sys_.write(9 * CHUNK + 8192, 4096, 0xA3)
    during_b2: dict[str, bytes] = {}

    def write_while_frozen(when: str) -> None:
        # after the freeze of backup 2: must be missing from backup 2 and present in backup 3
        if when == "frozen":
            during_b2.update(data=data.snapshot(), sys=sys_.snapshot())
            data.write(12 * CHUNK, 64 * 1024, 0xB1)
            sys_.write(13 * CHUNK, 64 * 1024, 0xB2)
        elif when == "layer2:data":  # on the second overlay: reaches the image by the final commit
            data.write(14 * CHUNK + 128 * 1024, 64 * 1024, 0xB3)

    b2, warnings = run_backup(session, "20240102T000000Z-0002", during=write_while_frozen)
    points[b2.backup_id] = during_b2
    assert warnings == []
    d2, s2 = b2.disk("data"), b2.disk("sys")
    assert d2.export_mode == s2.export_mode == f"incremental from {b1.backup_id}"
    assert d2.incremental_from == b1.backup_id and d2.bitmap == "hotvm-20240102T000000Z-0002"
    assert 0 < d2.bytes_read <= 3 * CHUNK  # chunks 3, 5, 6
    assert 0 < s2.bytes_read <= 1 * CHUNK  # chunk 9
    assert d2.bytes_reused > 0 and s2.bytes_reused > 0
    # the superseded bitmap is gone, this backup's is recording
    assert set(bitmaps(vm, data_img)) == set(bitmaps(vm, sys_img)) == {"hotvm-20240102T000000Z-0002"}

    b3, warnings = run_backup(session, "20240103T000000Z-0003")
    points[b3.backup_id] = {"data": data.snapshot(), "sys": sys_.snapshot()}
    d3, s3 = b3.disk("data"), b3.disk("sys")
    assert d3.incremental_from == s3.incremental_from == b2.backup_id
    assert 0 < d3.bytes_read <= 2 * CHUNK  # chunks 12 and 14: written during backup 2
    assert 0 < s3.bytes_read <= 1 * CHUNK  # chunk 13
    for manifest in (b1, b2, b3):
        assert_restores(config, manifest, points[manifest.backup_id], tmp_path / "restored")
    assert points[b2.backup_id]["data"] != points[b3.backup_id]["data"]
    vm.stop()


def test_lost_or_deleted_bitmap_means_full_read_with_warning(qemu, tmp_path: Path) -> None:
    data_img, sys_img = make_images(tmp_path)
    vm = qemu(specs(data_img, sys_img))
    data, sys_ = Disk(vm, "data"), Disk(vm, "sys")
    data.write(0, MiB, 0x11)
    sys_.write(5 * CHUNK, MiB, 0x12)
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")
    session = backup.open_session("web01", config)
    b1, _ = run_backup(session, "20240101T000000Z-0001")

    # someone deletes the bitmap of the data disk
    data_node = next(n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)  # type: ignore[union-attr]
                     if n["file"] == str(data_img) and n["drv"] == "qcow2")  # fmt: skip
    vm.qmp("block-dirty-bitmap-remove", node=data_node, name="hotvm-20240101T000000Z-0001")
    data.write(2 * CHUNK, MiB, 0x21)
    b2, warnings = run_backup(session, "20240102T000000Z-0002")
    d2 = b2.disk("data")
    assert d2.incremental_from is None and d2.export_mode.startswith(
        "full (bitmap hotvm-20240101T000000Z-0001 missing"
    )
    assert any(
        "disk data: not incremental from 20240101T000000Z-0001" in w and "missing" in w for w in warnings
    )
    assert d2.bytes_read >= 2 * MiB  # every allocated byte was read again
    assert b2.disk("sys").incremental_from == b1.backup_id
    after_b2 = {"data": data.snapshot(), "sys": sys_.snapshot()}

    # clean restart of QEMU on the same files: the qcow2 keeps its persistent bitmap, raw loses it
    vm.stop()
    vm = qemu(specs(data_img, sys_img))
    data.vm = sys_.vm = vm
    assert "hotvm-20240102T000000Z-0002" in bitmaps(vm, data_img)
    assert bitmaps(vm, sys_img) == {}
    data.write(7 * CHUNK, 64 * 1024, 0x31)
    sys_.write(8 * CHUNK, 64 * 1024, 0x32)
    b3, warnings = run_backup(session, "20240103T000000Z-0003")
    d3, s3 = b3.disk("data"), b3.disk("sys")
    assert d3.incremental_from == b2.backup_id and 0 < d3.bytes_read <= CHUNK
    assert s3.incremental_from is None and "missing" in s3.export_mode
    assert any(w.startswith("disk sys: not incremental") for w in warnings)
    after_b3 = {"data": data.snapshot(), "sys": sys_.snapshot()}

    # a crash (SIGKILL) leaves the qcow2's persistent bitmap inconsistent: full read, never trusted
    vm.proc.kill()
    vm.proc.wait()
    vm = qemu(specs(data_img, sys_img))
    data.vm = sys_.vm = vm
    assert bitmaps(vm, data_img)["hotvm-20240103T000000Z-0003"].get("inconsistent") is True
    data.write(9 * CHUNK, 64 * 1024, 0x41)
    b4, warnings = run_backup(session, "20240104T000000Z-0004")
    assert b4.disk("data").incremental_from is None and "inconsistent" in b4.disk("data").export_mode
    assert set(bitmaps(vm, data_img)) == {"hotvm-20240104T000000Z-0004"}  # the inconsistent one removed
    after_b4 = {"data": data.snapshot(), "sys": sys_.snapshot()}

    for manifest, expected in ((b2, after_b2), (b3, after_b3), (b4, after_b4)):
        assert_restores(config, manifest, expected, tmp_path / "restored")
    vm.stop()


def test_failed_run_drops_only_its_own_bitmap(qemu, tmp_path: Path) -> None:
    data_img, sys_img = make_images(tmp_path)
    vm = qemu(specs(data_img, sys_img))
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")
    session = backup.open_session("web01", config)
    run_backup(session, "20240101T000000Z-0001")
    frozen = backup.add_redo(session, ["data", "sys"], "20240102T000000Z-0002", track_changes=True)
    assert {f.bitmap for f in frozen} == {"hotvm-20240102T000000Z-0002"}
    # while frozen, QEMU refuses to remove the qcow2's persistent bitmap (its image node is read-only)
    assert backup.drop_bitmaps(session, {"data": ["hotvm-20240102T000000Z-0002"]}) == []
    # the flow's failure path: roll back (reconcile), then drop the new bitmaps of disks not journaled
    backup.reconcile(session)
    removed = backup.drop_bitmaps(session, {f.device: [f.bitmap] for f in frozen if f.bitmap})
    assert sorted(removed) == ["data: hotvm-20240102T000000Z-0002", "sys: hotvm-20240102T000000Z-0002"]
    assert set(bitmaps(vm, data_img)) == {"hotvm-20240101T000000Z-0001"}
    # a retry of the same set (same id) after a crash finds its stale bitmap and starts it again
    backup.add_redo(session, ["data"], "20240102T000000Z-0002", track_changes=True)
    backup.add_redo(session, ["data"], "20240102T000000Z-0003", track_changes=False)
    backup.reconcile(session)
    backup.add_redo(session, ["data"], "20240102T000000Z-0002", track_changes=True)
    assert bitmaps(vm, data_img)["hotvm-20240102T000000Z-0002"]["count"] == 0
    backup.reconcile(session)
    vm.stop()


def test_flow_reports_incremental(prefect_server, qemu, tmp_path: Path) -> None:
    from flows.backup_vm import backup_vm

    data_img, sys_img = make_images(tmp_path)
    vm = qemu(specs(data_img, sys_img))
    data = Disk(vm, "data")
    data.write(0, MiB, 0x51)
    config = write_config(tmp_path / "hotvm.yaml", {"web01": vm.qmp_path}, f"file://{tmp_path}/target")
    first = backup_vm(vm="web01", config=str(config))
    assert {d["mode"] for d in first["disks"]} == {"full (no earlier backup of this disk on the target)"}
    data.write(10 * CHUNK, 64 * 1024, 0x52)
    second = backup_vm(vm="web01", config=str(config))
    assert {d["mode"] for d in second["disks"]} == {f"incremental from {first['backup_id']}"}
    assert [s["note"] for s in second["steps"] if s["name"] == "export" and s["device"] == "data"] == [
        f"incremental from {first['backup_id']}"
    ]
    assert set(bitmaps(vm, data_img)) == {f"hotvm-{second['backup_id']}"}
    assert second["warnings"] == []
    vm.stop()


def patch_bytes(record: DiskRecord, parent: DiskRecord) -> int:
    """Plain bytes of the entries a set added to its parent's chunk list: what its incremental stored."""
    old = set(parent.chunks)
    return sum(n for (_, _, n), entry in zip(record.refs(), record.chunks, strict=True) if entry not in old)


def test_spread_64k_writes_store_patches_and_every_point_restores(qemu, tmp_path: Path) -> None:
    data_img, sys_img = make_images(tmp_path)
    vm = qemu(specs(data_img, sys_img))
    data, sys_ = Disk(vm, "data"), Disk(vm, "sys")
    for i in range(16):  # every chunk holds data
        data.write(i * CHUNK, CHUNK, 0x10 + i)
    sys_.write(0, 8 * MiB, 0x30)
    config = write_config(tmp_path / "hotvm.yaml", {"db01": vm.qmp_path}, f"file://{tmp_path}/target")
    session = backup.open_session("db01", config)
    b1, _ = run_backup(session, "20240101T000000Z-0001")
    points = {b1.backup_id: {"data": data.snapshot(), "sys": sys_.snapshot()}}
    manifests = [b1]
    for n in range(2, 7):  # five weeks of a database writing 64 KiB blocks all over its disk
        # one block in each of 12 chunks, at another place every week
        blocks = [k * (CHUNK // K64) + (7 * n + 3 * k) % (CHUNK // K64) for k in range(12)]
        for k, block in enumerate(blocks):
            data.write(block * K64, K64, (0x40 + 16 * n + k) % 256)
        b, warnings = run_backup(session, f"2024010{n}T000000Z-000{n}")
        assert warnings == [] and b.format_version == 3
        points[b.backup_id] = {"data": data.snapshot(), "sys": sys_.snapshot()}
        record, parent = b.disk("data"), manifests[-1].disk("data")
        assert record.incremental_from == manifests[-1].backup_id
        patched = [p for p in record.pieces() if p.patches]
        assert all(len(p.patches) <= MAX_PATCHES_PER_CHUNK for p in patched)
        changed = len(blocks) * K64
        if n - 1 <= MAX_PATCHES_PER_CHUNK:  # patches, not whole chunks: read and stored ~ what changed
            assert len(patched) == 12 and all(len(p.patches) == n - 1 for p in patched)
            assert record.bytes_read <= 2 * changed
            assert patch_bytes(record, parent) <= 2 * changed
        else:  # a fifth patch on a chunk: it is stored whole again (restore stays bounded)
            assert patched == [] and record.bytes_read == 12 * CHUNK
        manifests.append(b)
    for manifest in manifests:
        assert_restores(config, manifest, points[manifest.backup_id], tmp_path / "restored")
    vm.stop()


def test_clone_incremental_dedups_against_its_template(tmp_path: Path) -> None:
    """A clone of a template and the template get the same update (same 64 KiB blocks at the same
    places): the clone's incremental stores nothing new, its patches are the template's."""
    template = tmp_path / "template.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(template), str(SIZE))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {SIZE}", str(template)],
                   check=True, capture_output=True)  # fmt: skip
    vms, disks = {}, {}
    try:
        for name in ("tpl", "clone"):
            image = tmp_path / f"{name}.qcow2"
            shutil.copyfile(template, image)
            (tmp_path / name).mkdir()
            vms[name] = start_qemu(tmp_path / name, [DiskSpec("data", image)])
            disks[name] = Disk(vms[name], "data")
            disks[name].model[:] = b"\x5a" * SIZE
        config = write_config(tmp_path / "hotvm.yaml", {n: vm.qmp_path for n, vm in vms.items()},
                              f"file://{tmp_path}/target")  # fmt: skip
        sessions = {n: backup.open_session(n, config) for n in vms}
        full = {n: run_backup(s, "20240101T000000Z-0001")[0] for n, s in sessions.items()}
        assert full["clone"].disk("data").bytes_new == 0  # the clone's full dedups against the template
        blocks = random.Random(7).sample(range(SIZE // K64), 24)
        for disk in disks.values():  # next week's update, in both
            for k, block in enumerate(blocks):
                disk.write(block * K64, K64, 0x60 + k)
        week = {n: run_backup(s, "20240108T000000Z-0002")[0] for n, s in sessions.items()}
        tpl, clone = week["tpl"].disk("data"), week["clone"].disk("data")
        assert tpl.incremental_from == clone.incremental_from == "20240101T000000Z-0001"
        patches = [e for e in clone.chunks if len(e) == 4]
        assert patches and patches == [e for e in tpl.chunks if len(e) == 4]
        assert clone.bytes_new == 0  # every patch of the clone was already stored by the template
        for name, manifest in week.items():
            assert_restores(config, manifest, {"data": disks[name].snapshot()}, tmp_path / name / "restored")
    finally:
        for vm in vms.values():
            vm.stop()

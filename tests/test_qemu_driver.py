"""QemuDriver against a real QEMU (TCG, no guest OS); guest writes are HMP qemu-io on a second socket."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from qemu_helpers import DiskSpec, RunningQemu, qemu_img, read_pattern_ok

from hotvm.config import HostConfig, VMConfig
from hotvm.errors import BlockJobError, DiskNotSupported, HypervisorError, HypervisorUnreachable
from hotvm.hypervisors import open_driver
from hotvm.hypervisors.base import OVERLAY_MARKER, DiskMode, HypervisorDriver
from hotvm.hypervisors.qemu import QemuDriver

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86"),
    pytest.mark.timeout(60),
]

K64 = 64 * 1024
A, B, C = 0xAA, 0xBB, 0xCC  # written before layer 1, after layer 1, after layer 2 (at 0, 64k, 128k)


def driver(vm: RunningQemu, **host: object) -> QemuDriver:
    drv = open_driver(HostConfig(name="host", **host), VMConfig(name="vm1", qmp=vm.qmp_path))
    assert isinstance(drv, QemuDriver)
    return drv


def image(tmp_path: Path, name: str, fmt: str = "qcow2", size: str = "16M") -> Path:
    path = tmp_path / name
    qemu_img("create", "-q", "-f", fmt, str(path), size)
    return path


def frozen_bytes(path: str, fmt: str, tmp_path: Path) -> bytes:
    """Read a frozen layer the way the export does: qemu-img without -U (QEMU must share it read-only)."""
    out = tmp_path / f"export-{hashlib.sha1(path.encode()).hexdigest()[:8]}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, str(out))
    return out.read_bytes()


def overlays_left(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.rglob("*") if OVERLAY_MARKER in p.name)


def backing_chain(path: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [entry["filename"] for entry in json.loads(out.stdout)]


# --------------------------------------------------------------------------- (a) the full layered cycle


def test_layered_redo_cycle_keeps_every_write(qemu, tmp_path: Path) -> None:
    vda, hd0 = image(tmp_path, "vda.qcow2"), image(tmp_path, "hd0.img", "raw")
    vm = qemu(
        [DiskSpec("vda", vda), DiskSpec("hd0", hd0, format="raw", bus="ide", style="drive")]
    )  # fmt: skip
    drv = driver(vm)
    assert isinstance(drv, HypervisorDriver)
    before = {d.device: d for d in drv.list_disks()}
    assert before["vda"].path == str(vda) and before["hd0"].path == str(hd0)
    devices = ["vda", "hd0"]
    for dev in devices:
        vm.qemu_io(dev, f"write -P {A:#x} 0 64k")

    layer1 = {f.device: f for f in drv.add_redo(devices, "t1")}
    assert layer1["vda"].image == str(vda) and layer1["hd0"].image == str(hd0)
    assert layer1["hd0"].format == "raw" and layer1["vda"].virtual_size == 16 << 20
    assert layer1["vda"].overlay == f"{vda}{OVERLAY_MARKER}t1-1.qcow2"
    for dev in devices:
        vm.qemu_io(dev, f"write -P {B:#x} 64k 64k")

    for dev in devices:  # the frozen image has A, not B, and can be read while the guest writes
        data = frozen_bytes(layer1[dev].image, layer1[dev].format, tmp_path)
        assert data[:K64] == bytes([A]) * K64
        assert data[K64 : 2 * K64] == bytes(K64)

    layer2 = {f.device: f for f in drv.add_redo(devices, "t1")}
    assert layer2["vda"].image == layer1["vda"].overlay and layer2["vda"].format == "qcow2"
    assert layer2["vda"].overlay == f"{vda}{OVERLAY_MARKER}t1-2.qcow2"
    mid = {d.device: d for d in drv.list_disks()}
    assert mid["vda"].hotvm_overlays == [layer1["vda"].overlay, layer2["vda"].overlay]
    assert mid["vda"].path == str(vda)
    for dev in devices:
        vm.qemu_io(dev, f"write -P {C:#x} 128k 64k")

    for dev in devices:
        assert drv.commit_level1(dev).stall_ms is None
        assert not Path(layer1[dev].overlay).exists()
    assert {d.device: d.hotvm_overlays for d in drv.list_disks()} == {
        "vda": [layer2["vda"].overlay],
        "hd0": [layer2["hd0"].overlay],
    }
    stalls = []
    for dev in devices:
        result = drv.commit_final(dev)
        assert result.stall_ms is not None and result.stall_ms >= 0
        stalls.append(result.stall_ms)
    print(f"final-commit stall ms: {', '.join(f'{s:.1f}' for s in stalls)}")

    after = {d.device: d for d in drv.list_disks()}
    for dev in devices:  # exactly as before the backup: same node, same file, no overlays
        assert after[dev] == before[dev]
    assert [n for n in drv.describe_vm()["block_nodes"] if n["node"].startswith("hotvm")] == []
    drv.close()
    vm.stop()
    assert overlays_left(tmp_path) == []
    for path, fmt in ((vda, "qcow2"), (hd0, "raw")):
        for pattern, offset in ((A, 0), (B, K64), (C, 2 * K64)):
            assert read_pattern_ok(path, fmt, pattern, offset, K64), (path, hex(pattern))
    assert backing_chain(vda) == [str(vda)]


# --------------------------------------------------------------------------- (b) buses, formats, modes


def test_modes_and_one_transaction_over_buses(qemu, tmp_path: Path) -> None:
    vm = qemu(
        [
            DiskSpec("vda", image(tmp_path, "vda.qcow2")),
            DiskSpec("hd0", image(tmp_path, "hd0.img", "raw"), format="raw", bus="ide", style="drive"),
            DiskSpec("sda", image(tmp_path, "sda.qcow2"), bus="scsi"),
            DiskSpec("ro0", image(tmp_path, "ro0.img", "raw"), format="raw", style="drive", read_only=True),
            DiskSpec("snap0", image(tmp_path, "snap0.img", "raw"), format="raw", bus="ide", style="drive",
                     snapshot=True),
            DiskSpec("cd0", None, bus="cdrom", style="drive"),
        ]
    )  # fmt: skip
    drv = driver(vm)
    disks = {d.device: d for d in drv.list_disks()}
    assert {k: d.mode for k, d in disks.items()} == {
        "vda": DiskMode.PERSISTENT,
        "hd0": DiskMode.PERSISTENT,
        "sda": DiskMode.PERSISTENT,
        "ro0": DiskMode.READ_ONLY,
        "snap0": DiskMode.TEMPORARY,
        "cd0": DiskMode.NO_FILE,
    }
    assert {k: d.bus for k, d in disks.items() if k != "cd0"} == {
        "vda": "virtio", "hd0": "ide", "sda": "scsi", "ro0": "virtio", "snap0": "ide",
    }  # fmt: skip
    assert disks["snap0"].path == str(tmp_path / "snap0.img")
    assert disks["sda"].format == "qcow2" and disks["hd0"].format == "raw"

    for bad, why in (("ro0", "read-only"), ("snap0", "snapshot=on"), ("cd0", "no medium")):
        with pytest.raises(DiskNotSupported, match=why) as err:
            drv.add_redo(["vda", bad], "t1")  # a refused disk leaves the others untouched too
        assert bad in str(err.value) and "vm1" in str(err.value) and "exclude_disks" in str(err.value)
    assert all(not d.hotvm_overlays for d in drv.list_disks())

    persistent = [k for k, d in disks.items() if d.backed_up]
    frozen = drv.add_redo(persistent, "t1")
    assert sorted(f.device for f in frozen) == sorted(persistent)
    assert all(len(d.hotvm_overlays) == (1 if d.backed_up else 0) for d in drv.list_disks())
    for dev in persistent:
        drv.commit_final(dev)
    assert [d for d in drv.list_disks() if d.hotvm_overlays] == []
    assert overlays_left(tmp_path) == []
    description = drv.describe_vm()
    assert description["cpus"] == 1 and description["memory_bytes"] == 64 << 20
    assert {d["device"] for d in description["disks"]} == set(disks)
    json.dumps(description)


def test_overlay_that_cannot_be_created_leaves_nothing_behind(qemu, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    vm = qemu([DiskSpec("vda", image(tmp_path, "vda.qcow2")), DiskSpec("vdb", image(moved, "vdb.qcow2"))])
    moved.rename(tmp_path / "elsewhere")  # QEMU keeps the file open; the directory for its overlay is gone
    drv = driver(vm)
    before = drv.list_disks()
    with pytest.raises(HypervisorError, match="cannot create overlay") as err:
        drv.add_redo(["vda", "vdb"], "t1")
    assert "vdb" in str(err.value) and "writable" in err.value.hint
    assert drv.list_disks() == before
    assert overlays_left(tmp_path) == []
    assert all(not n["node"].startswith("hotvm") for n in drv.describe_vm()["block_nodes"])

    with pytest.raises(HypervisorError, match="cannot create overlay"):
        vm_cfg = VMConfig(name="vm1", qmp=vm.qmp_path, overlay_dir=tmp_path / "missing")
        QemuDriver(vm_cfg, HostConfig(name="h")).add_redo(["vda"], "t1")
    assert drv.list_disks() == before


# --------------------------------------------------------------------------- (c) reconcile after a crash


def test_reconcile_after_crash_commits_everything_back(qemu, tmp_path: Path) -> None:
    vda, hd0 = image(tmp_path, "vda.qcow2"), image(tmp_path, "hd0.img", "raw")
    vm = qemu([DiskSpec("vda", vda), DiskSpec("hd0", hd0, format="raw", bus="ide", style="drive")])
    first = driver(vm)
    before = {d.device: d for d in first.list_disks()}
    for dev in ("vda", "hd0"):
        vm.qemu_io(dev, f"write -P {A:#x} 0 64k")
    first.add_redo(["vda", "hd0"], "t1")
    for dev in ("vda", "hd0"):
        vm.qemu_io(dev, f"write -P {B:#x} 64k 64k")
    first.add_redo(["vda"], "t1")  # vda: two layers, hd0: one
    vm.qemu_io("vda", f"write -P {C:#x} 128k 64k")
    del first  # the "crash": no commit, no close

    actions = driver(vm).reconcile()
    assert {a.device: len(a.overlays) for a in actions} == {"vda": 2, "hd0": 1}
    assert all(OVERLAY_MARKER in path for a in actions for path in a.overlays)
    assert {d.device: d for d in driver(vm).list_disks()} == before
    assert driver(vm).reconcile() == []
    vm.stop()
    assert overlays_left(tmp_path) == []
    for pattern, offset in ((A, 0), (B, K64), (C, 2 * K64)):
        assert read_pattern_ok(vda, "qcow2", pattern, offset, K64)
    for pattern, offset in ((A, 0), (B, K64)):
        assert read_pattern_ok(hd0, "raw", pattern, offset, K64)


def test_reconcile_finishes_a_job_and_a_node_left_by_a_crash(qemu, tmp_path: Path) -> None:
    vda = image(tmp_path, "vda.qcow2")
    vm = qemu([DiskSpec("vda", vda)])
    drv = driver(vm)
    vm.qemu_io("vda", f"write -P {A:#x} 0 64k")
    drv.add_redo(["vda"], "t1")
    vm.qemu_io("vda", f"write -P {B:#x} 64k 64k")
    disk = drv.list_disks()[0]
    # crash 1: a final commit was started and reached READY, nobody completed it
    vm.qmp("block-commit", **{"job-id": "hotvm-cf-vda", "device": disk.node_name, "base-node": "vda-fmt",
                              "auto-dismiss": False})  # fmt: skip
    # crash 2: an overlay node was added for a next layer but never attached
    orphan = tmp_path / f"vda.qcow2{OVERLAY_MARKER}t2-1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(orphan), "16M")
    vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "hotvm-orphan"},
           file={"driver": "file", "filename": str(orphan)})  # fmt: skip

    actions = driver(vm).reconcile()
    # the adopted job pivoted off t1-1 itself; its node and file are dropped like the orphan
    removed = sorted(path for a in actions if a.device == "" for path in a.overlays)
    assert removed == sorted([str(orphan), f"{vda}{OVERLAY_MARKER}t1-1.qcow2"])
    assert drv.list_disks()[0].hotvm_overlays == []
    assert drv.list_disks()[0].node_name == "vda-fmt"
    assert vm.qmp("query-jobs") == []
    vm.stop()
    assert overlays_left(tmp_path) == []
    assert read_pattern_ok(vda, "qcow2", B, K64, K64)


# --------------------------------------------------------------------------- (d) the user's own chain


def test_users_backing_chain_is_backed_up_as_presented_and_left_alone(qemu, tmp_path: Path) -> None:
    base = image(tmp_path, "template.qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {A:#x} 0 64k", str(base)], check=True,
                   capture_output=True)  # fmt: skip
    top = tmp_path / "vm1.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    base_digest = hashlib.sha256(base.read_bytes()).hexdigest()
    vm = qemu([DiskSpec("vda", top)])
    drv = driver(vm)
    (disk,) = drv.list_disks()
    assert disk.mode is DiskMode.PERSISTENT
    assert disk.path == str(top) and disk.backing_chain == [str(base)] and disk.hotvm_overlays == []
    assert drv.reconcile() == []

    (frozen,) = drv.add_redo(["vda"], "t1")
    assert frozen.image == str(top) and frozen.format == "qcow2"
    vm.qemu_io("vda", f"write -P {B:#x} 64k 64k")
    exported = frozen_bytes(frozen.image, frozen.format, tmp_path)  # follows the user's chain
    assert exported[:K64] == bytes([A]) * K64 and exported[K64 : 2 * K64] == bytes(K64)
    drv.add_redo(["vda"], "t1")
    mid = drv.list_disks()[0]
    assert mid.path == str(top) and mid.backing_chain == [str(base)] and len(mid.hotvm_overlays) == 2
    drv.commit_level1("vda")
    drv.commit_final("vda")
    assert drv.list_disks() == [disk]
    vm.stop()
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_digest
    assert backing_chain(top) == [str(top), str(base)]
    assert read_pattern_ok(top, "qcow2", A, 0, K64) and read_pattern_ok(top, "qcow2", B, K64, K64)
    assert overlays_left(tmp_path) == []


# --------------------------------------------------------------------------- (e) unreachable VM


def test_missing_dead_and_busy_sockets_are_unreachable(tmp_path: Path) -> None:
    host = HostConfig(name="h")
    missing = tmp_path / "missing.qmp"
    with pytest.raises(HypervisorUnreachable, match=str(missing)) as err:
        QemuDriver(VMConfig(name="vm1", qmp=missing), host).list_disks()
    assert "vm1" in str(err.value) and "server=on,wait=off" in err.value.hint

    dead = tmp_path / "dead.qmp"  # a socket file left by a QEMU that died
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dead))
    sock.close()
    with pytest.raises(HypervisorUnreachable, match=str(dead)):
        QemuDriver(VMConfig(name="vm1", qmp=dead), host).list_disks()

    busy = tmp_path / "busy.qmp"  # listening but never greets (another client holds QEMU's monitor)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(busy))
    listener.listen(1)
    try:
        with pytest.raises(HypervisorUnreachable, match="no QMP greeting"):
            QemuDriver(VMConfig(name="vm1", qmp=busy), host, connect_timeout=0.5).describe_vm()
    finally:
        listener.close()


def test_socket_is_released_between_calls(qemu, tmp_path: Path) -> None:
    vm = qemu([DiskSpec("vda", image(tmp_path, "vda.qcow2"))])
    drv = driver(vm)
    drv.list_disks()
    other = driver(vm)  # a second client on the same socket works because the first let go
    assert other.describe_vm()["status"] == "running"
    drv.close()
    other.close()


# --------------------------------------------------------------------------- (f) I/O error during a commit


def _failing_base(tmp_path: Path, once: bool) -> tuple[Path, DiskSpec]:
    path = image(tmp_path, "vda.qcow2")
    node = {
        "driver": "qcow2",
        "node-name": "vda-fmt",
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 5, "once": once}],
            "image": {"driver": "file", "filename": str(path)},
        },
    }
    return path, DiskSpec("vda", path, blockdev=node)


def test_io_error_during_commit_cancel(qemu, tmp_path: Path, caplog) -> None:
    path, spec = _failing_base(tmp_path, once=False)
    vm = qemu([spec])
    drv = driver(vm, on_io_error="cancel")
    (disk,) = drv.list_disks()
    assert disk.path == str(path) and disk.mode is DiskMode.PERSISTENT
    drv.add_redo(["vda"], "t1")
    vm.qemu_io("vda", f"write -P {B:#x} 0 64k")
    with caplog.at_level(logging.INFO, logger="hotvm.qemu"), pytest.raises(BlockJobError) as err:
        drv.commit_final("vda")
    assert "I/O error" in str(err.value) and "cancel" in str(err.value) and "storage" in err.value.hint
    assert any("on_io_error=cancel" in r.message for r in caplog.records)
    assert vm.qmp("query-jobs") == []  # no job left behind
    assert vm.qmp("query-status")["status"] == "running"  # the guest was never stopped
    (disk,) = drv.list_disks()
    assert len(disk.hotvm_overlays) == 1  # still on its overlay, for a later reconcile


def test_io_error_during_commit_resume(qemu, tmp_path: Path, caplog) -> None:
    path, spec = _failing_base(tmp_path, once=True)
    vm = qemu([spec])
    drv = driver(vm, on_io_error="resume")
    drv.add_redo(["vda"], "t1")
    vm.qemu_io("vda", f"write -P {B:#x} 0 64k")
    with caplog.at_level(logging.INFO, logger="hotvm.qemu"):
        drv.commit_final("vda")
    assert any("on_io_error=resume" in r.message for r in caplog.records)
    assert drv.list_disks()[0].hotvm_overlays == []
    vm.stop()
    assert read_pattern_ok(path, "qcow2", B, 0, K64)


def test_io_error_that_persists_is_resumed_three_times_then_cancelled(qemu, tmp_path: Path, caplog) -> None:
    _, spec = _failing_base(tmp_path, once=False)
    vm = qemu([spec])
    drv = driver(vm, on_io_error="resume")
    drv.add_redo(["vda"], "t1")
    vm.qemu_io("vda", f"write -P {B:#x} 0 64k")
    with caplog.at_level(logging.INFO, logger="hotvm.qemu"), pytest.raises(BlockJobError, match="3 resumes"):
        drv.commit_final("vda")
    assert sum("on_io_error=resume" in r.message for r in caplog.records) == 3
    assert vm.qmp("query-jobs") == []

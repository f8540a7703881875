"""vSphere driver against a real vcsim (govmomi's simulator, built from Debian's sources).

What vcsim 0.24 does NOT do (docs/vsphere.md): delta disks under snapshots, NFC export, CBT, parsing an
uploaded .vmx on RegisterVM, AnswerVM (our scripts/vcsim/main.go adds the last one, see there).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pyVmomi import vim
from vcsim_helpers import (
    PASSWORD_ENV,
    USER,
    Vcsim,
    build_vcsim,
    running_vcsim,
    self_signed_cert,
    start_vcsim,
    vsphere_config,
)

from hotvm.errors import ConfigError, HotvmError, HypervisorUnreachable, UnknownVMError
from hotvm.hypervisors.base import OVERLAY_MARKER, VMDefinition
from hotvm.hypervisors.vsphere import VSphereDriver, VSphereHost
from hotvm.hypervisors.vsphere_conn import Connection
from hotvm.hypervisors.vsphere_disks import snapshot_trees
from hotvm.hypervisors.vsphere_question import QuestionPending
from hotvm.models import HostConfig, VMConfig

MiB = 1 << 20


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    """Built once per session (cached across sessions by scripts/build-vcsim.sh)."""
    return build_vcsim()


@pytest.fixture
def vcsim(vcsim_binary: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vcsim]:
    yield from running_vcsim(vcsim_binary, monkeypatch)


VM = "DC0_H0_VM0"
VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "13"
displayName = "DC0_H0_VM0"
guestOS = "debian11-64"
numvcpus = "1"
memsize = "32"
uuid.bios = "42 1a 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"
vc.uuid = "50 1a 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"
nvram = "DC0_H0_VM0.nvram"
scsi0.present = "TRUE"
scsi0.virtualDev = "lsilogic"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "disk1.vmdk"
scsi0:2.present = "TRUE"
scsi0:2.fileName = "scratch.vmdk"
scsi0:2.mode = "independent-persistent"
ethernet0.present = "TRUE"
ethernet0.addressType = "vpx"
ethernet0.generatedAddress = "00:50:56:aa:bb:cc"
"""


def host_config(sim: Vcsim, name: str = "vc", **extra: object) -> HostConfig:
    return HostConfig(name=name, driver="vsphere", url=sim.url, username=USER, password_env=PASSWORD_ENV,
                      verify_tls=False, **extra)  # fmt: skip


def wait(conn: Connection, task: vim.Task) -> object:
    return conn.wait(task, "test task", 30).result


def add_disk(conn: Connection, vm: vim.VirtualMachine, mode: str, size: int = 4 * MiB) -> None:
    """A new disk on the VM's SCSI controller, in the given disk mode (vcsim creates its file)."""
    controller = next(
        d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController)
    )
    used = {d.unitNumber for d in vm.config.hardware.device if d.controllerKey == controller.key}
    disk = vim.vm.device.VirtualDisk(
        controllerKey=controller.key, unitNumber=min(set(range(16)) - used - {7}), capacityInKB=size // 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode=mode, fileName=""),
    )  # fmt: skip
    spec = vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
    wait(conn, vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[spec])))


def disk_files(vm: vim.VirtualMachine) -> dict[str, str]:
    """scsi0:N -> datastore path, read straight from vSphere."""
    out = {}
    for d in vm.config.hardware.device:
        if isinstance(d, vim.vm.device.VirtualDisk):
            out[f"scsi0:{d.unitNumber}"] = d.backing.fileName
    return out


def snapshot_names(conn: Connection, vm: vim.VirtualMachine) -> list[str]:
    return [t.name for t in snapshot_trees(conn, vm)]


def test_hot_backup_cycle_restores_the_uploaded_bytes(prefect_server, vcsim: Vcsim, tmp_path: Path) -> None:
    from flows.backup_vm import backup_vm
    from flows.restore_vm import restore_vm

    conn = Connection(host_config(vcsim))
    vm = conn.vm(VM)
    dc = conn.datacenter_of(vm)
    add_disk(conn, vm, "persistent")
    add_disk(conn, vm, "independent_persistent")
    add_disk(conn, vm, "independent_nonpersistent")
    files = disk_files(vm)
    data = {
        "scsi0:0": os.urandom(MiB // 2),
        "scsi0:1": os.urandom(MiB) + b"\x5a" * 3 * MiB,
    }  # 1 + 4 MiB disks
    for device, content in data.items():
        conn.upload(content, files[device], dc)
    conn.upload(VMX.encode(), vm.config.files.vmPathName, dc)
    wait(
        conn,
        vm.CreateSnapshot_Task(name="before-upgrade", description="the user's", memory=False, quiesce=False),
    )
    vcsim.ask(VM, "msg.hbacommon.outofspace: There is no more space for the redo log. Retry?", ["OK"])
    config = vsphere_config(tmp_path / "hotvm.yaml", vcsim, [VM], f"file://{tmp_path}/target")

    t0 = time.monotonic()
    result = backup_vm(vm=VM, config=str(config))
    backup_s = time.monotonic() - t0

    assert {d["device"] for d in result["disks"]} == {"scsi0:0", "scsi0:1"}
    skipped = {s["device"]: s["reason"] for s in result["skipped_disks"]}
    assert set(skipped) == {"scsi0:2", "scsi0:3"}
    assert "no-snapshot" in skipped["scsi0:2"] and "temporary" in skipped["scsi0:3"]
    assert [a["QuestionID"] for a in vcsim.answers()] == ["q1"]  # answered with its only choice
    assert vm.runtime.question is None
    assert snapshot_names(conn, vm) == ["before-upgrade"]  # hotvm's own are gone, the user's stays

    restored = restore_vm(vm=VM, to=str(tmp_path / "restored"), fmt="raw", config=str(config))
    by_device = {d["device"]: Path(d["path"]) for d in restored["disks"]}
    for device, content in data.items():
        restored_bytes = by_device[device].read_bytes()
        assert restored_bytes[: len(content)] == content
        assert restored_bytes[len(content) :] == bytes(len(restored_bytes) - len(content))  # the rest reads 0
    documents = tmp_path / "restored" / "config"
    assert (next(documents.rglob("DC0_H0_VM0.vmx"))).read_text() == VMX
    assert (next(documents.rglob("vmware.log"))).exists()

    t0 = time.monotonic()
    again = backup_vm(vm=VM, config=str(config))  # vcsim has no CBT: a full read, saying why
    again_s = time.monotonic() - t0
    for disk in again["disks"]:
        assert disk["incremental_from"] is None and "changed block tracking" in disk["mode"]
    assert snapshot_names(conn, vm) == ["before-upgrade"]
    print(f"\nvSphere backup of 2 disks (1+4 MiB) through the flow: {backup_s:.1f}s, again: {again_s:.1f}s")
    conn.close()


def test_quiesced_snapshot_and_no_cbt_means_a_full_read(vcsim: Vcsim) -> None:
    driver = VSphereDriver(VMConfig(name=VM), host_config(vcsim))
    frozen = driver.add_redo(["scsi0:0"], "b1", track_changes=True, quiesce=True)
    assert frozen[0].bitmap == "hotvm-b1" and frozen[0].consistency == "application"
    assert [t.quiesced for t in snapshot_trees(driver.conn, driver._vm())] == [True]  # VMware Tools quiescing
    with pytest.raises(HotvmError, match="changed block tracking"):
        driver.dirty_extents("scsi0:0", frozen[0].bitmap)
    driver.commit_final("scsi0:0")
    driver.close()


def test_multiple_choice_question_fails_the_step(vcsim: Vcsim) -> None:
    vcsim.ask(
        VM, "The virtual machine may have been moved or copied.", ["Cancel", "I moved it", "I copied it"]
    )
    driver = VSphereDriver(VMConfig(name=VM), host_config(vcsim))
    with pytest.raises(QuestionPending) as err:
        driver.add_redo(["scsi0:0"], "q1")
    assert "moved or copied" in str(err.value) and "'I copied it'" in str(err.value)
    assert "\n" not in str(err.value)
    assert vcsim.answers() == []  # never guessed
    assert [n for n in snapshot_names(driver.conn, driver._vm()) if OVERLAY_MARKER in n] == []
    driver.close()


def test_backup_flow_stops_on_a_multiple_choice_question(
    prefect_server, vcsim: Vcsim, tmp_path: Path
) -> None:
    from flows.backup_vm import backup_vm

    vcsim.ask(VM, "Cannot connect the virtual device ide0:0. Try to reconnect?", ["Yes", "No"], qid="q7")
    config = vsphere_config(tmp_path / "hotvm.yaml", vcsim, [VM], f"file://{tmp_path}/target", retries=0)
    with pytest.raises(HotvmError) as err:
        backup_vm(vm=VM, config=str(config))
    assert "ide0:0" in str(err.value) and "'Yes', 'No'" in str(err.value)
    assert vcsim.answers() == []
    driver = VSphereDriver(VMConfig(name=VM), host_config(vcsim))
    assert [n for n in snapshot_names(driver.conn, driver._vm()) if OVERLAY_MARKER in n] == []
    driver.close()


def test_reconcile_removes_only_hotvm_snapshots(vcsim: Vcsim) -> None:
    driver = VSphereDriver(VMConfig(name=VM), host_config(vcsim))
    vm = driver._vm()
    wait(driver.conn, vm.CreateSnapshot_Task(name="user-1", memory=False, quiesce=False))
    driver.add_redo(["scsi0:0"], "crashed")  # a run that died before its commits
    wait(driver.conn, vm.CreateSnapshot_Task(name="user-2", memory=False, quiesce=False))
    actions = driver.reconcile()
    assert [a.overlays for a in actions] == [[f"{OVERLAY_MARKER}crashed-1"]]
    assert snapshot_names(driver.conn, vm) == ["user-1", "user-2"]
    assert driver.reconcile() == []
    driver.close()


def test_connection_errors_are_one_clear_line(vcsim: Vcsim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "Bad-Pa55word")
    with pytest.raises(ConfigError) as err:
        Connection(host_config(vcsim))
    message = str(err.value)
    assert (
        USER in message and PASSWORD_ENV in message and "Bad-Pa55word" not in message and "\n" not in message
    )
    monkeypatch.setenv(PASSWORD_ENV, vcsim.password)
    with pytest.raises(HypervisorUnreachable, match="TLS .*verify_tls"):
        Connection(host_config(vcsim).model_copy(update={"verify_tls": True}))
    dead = host_config(vcsim).model_copy(update={"url": "https://127.0.0.1:1/sdk"})
    with pytest.raises(HypervisorUnreachable, match="cannot reach"):
        Connection(dead)
    with pytest.raises(HypervisorUnreachable, match="not answer as a vSphere SDK endpoint"):
        Connection(host_config(vcsim).model_copy(update={"url": vcsim.url.replace("/sdk", "/api")}))
    with pytest.raises(UnknownVMError, match="DC0_H0_VM1"):
        VSphereDriver(VMConfig(name="nope"), host_config(vcsim)).list_disks()


def test_verify_tls_with_a_ca_bundle(
    vcsim_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    sim = start_vcsim(vcsim_binary, "pw", tls=(cert, key))
    try:
        with pytest.raises(HypervisorUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            Connection(host_config(sim).model_copy(update={"verify_tls": True}))  # not in the system CAs
        conn = Connection(host_config(sim).model_copy(update={"verify_tls": cert}))
        vm = conn.vm(VM)
        assert conn.read(vm.config.files.vmPathName, conn.datacenter_of(vm)) is not None  # HTTPS verified too
        conn.close()
    finally:
        sim.stop()


def test_register_vm_on_a_second_host(vcsim: Vcsim, vcsim_binary: Path, tmp_path: Path) -> None:
    source = VSphereDriver(VMConfig(name=VM), host_config(vcsim))
    vm = source._vm()
    source.conn.upload(VMX.encode(), vm.config.files.vmPathName, source.conn.datacenter_of(vm))
    documents = source.config_documents()
    image = tmp_path / "restored-scsi0-0.raw"
    image.write_bytes(os.urandom(2 * MiB))
    definition = VMDefinition(
        name="web-standby", source_vm=VM, source_driver="vsphere", documents=documents, files={},
        description=source.describe_vm(), disks={"scsi0:0": image}, new_identity=True,
    )  # fmt: skip
    source.close()

    standby_sim = start_vcsim(vcsim_binary, vcsim.password)  # another vCenter: the standby site
    try:
        standby = VSphereHost(host_config(standby_sim, "standby", vm_dir="standby/copies"))
        first = standby.register_vm(definition)
        assert (first.action, first.started) == ("created", False)
        assert first.location == "[LocalDS_0] web-standby/web-standby.vmx"
        assert "web-standby" in standby.list_vms()
        copy = standby.conn.vm("web-standby")
        assert copy.parent.name == "copies" and copy.runtime.powerState == "poweredOff"
        dc = standby.conn.datacenter_of(copy)
        vmx = standby.conn.read(first.location, dc).decode()
        assert 'displayName = "web-standby"' in vmx and 'scsi0:0.fileName = "web-standby.vmdk"' in vmx
        assert "uuid.bios" not in vmx and "00:50:56:aa:bb:cc" not in vmx and 'uuid.action = "create"' in vmx
        assert "scsi0:2" not in vmx  # a disk the backup does not hold is not referenced
        assert standby.conn.read("[LocalDS_0] web-standby/web-standby-flat.vmdk", dc) == image.read_bytes()

        assert standby.register_vm(definition).action == "unchanged"
        image.write_bytes(os.urandom(2 * MiB))
        assert standby.register_vm(definition).action == "updated"
        assert standby.conn.read("[LocalDS_0] web-standby/web-standby-flat.vmdk", dc) == image.read_bytes()
        assert standby.list_vms().count("web-standby") == 1
        standby.close()
    finally:
        standby_sim.stop()

    beside = VSphereHost(host_config(vcsim, vm_dir="restored"))  # a copy beside the original, started
    result = beside.register_vm(replace(definition, name="web-copy"), start=True)
    copy = beside.conn.vm("web-copy")
    assert (result.action, result.started, copy.runtime.powerState) == ("created", True, "poweredOn")
    assert copy.parent.name == "restored" and VM in beside.list_vms()
    beside.close()

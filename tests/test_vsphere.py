"""vSphere driver against a real vcsim (govmomi's simulator, built from Debian's sources).

What vcsim 0.24 does NOT do (docs/vsphere.md): delta disks under snapshots, NFC export, CBT, parsing an
uploaded .vmx on RegisterVM, AnswerVM (our scripts/vcsim/main.go adds the last one, see there).
"""

from __future__ import annotations

import os
import tempfile
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

from hotvm.config import HostConfig, VMConfig
from hotvm.errors import ConfigError, HotvmError, HypervisorError, HypervisorUnreachable, UnknownVMError
from hotvm.hypervisors.base import OVERLAY_MARKER, VMDefinition
from hotvm.hypervisors.vsphere import VSphereDriver, VSphereHost
from hotvm.hypervisors.vsphere_conn import Connection
from hotvm.hypervisors.vsphere_disks import snapshot_trees
from hotvm.hypervisors.vsphere_question import QuestionPending

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


# --------------------------------------------------------------------------- two sites, end to end

SOURCE_DISK = os.urandom(MiB) + b"\xa5" * MiB  # what the guest "wrote" on scsi0:0 (2 MiB)


def two_site_config(path: Path, source: Vcsim, standby: Vcsim, target: Path) -> Path:
    """hotvm.yaml: the VM on vCenter 'vc' with its standby on vCenter 'dr' (another site)."""
    common = [f"    username: {USER}", f"    password_env: {PASSWORD_ENV}", "    verify_tls: false"]
    lines = ["hosts:", "  - name: vc", "    driver: vsphere", f"    url: {source.url}", *common,
             "    vms:", f"      - name: {VM}", "        standby_host: dr",
             "  - name: dr", "    driver: vsphere", f"    url: {standby.url}", *common,
             "    datastore: LocalDS_0", "    vm_dir: standby/copies",
             "targets:", "  - name: nas", f"    url: file://{target}",
             "retries:", "  retries: 1", "  retry_delay_s: 1"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def two_sites(vcsim: Vcsim, vcsim_binary: Path, tmp_path: Path) -> Iterator[tuple[Vcsim, Vcsim, Path]]:
    """Source vCenter with DC0_H0_VM0's disk and .vmx holding known bytes, a second vCenter as the DR
    site (same password: one $HOTVM_VC_PASSWORD), and their config."""
    conn = Connection(host_config(vcsim))
    vm = conn.vm(VM)
    dc = conn.datacenter_of(vm)
    conn.upload(SOURCE_DISK, disk_files(vm)["scsi0:0"], dc)
    conn.upload(VMX.encode(), vm.config.files.vmPathName, dc)
    conn.close()
    standby = start_vcsim(vcsim_binary, vcsim.password)
    try:
        yield vcsim, standby, two_site_config(tmp_path / "hotvm.yaml", vcsim, standby, tmp_path / "target")
    finally:
        standby.stop()


def restored_bytes(expected: bytes, capacity: int) -> bytes:
    """A restored disk: the bytes written, then zeros up to the disk's capacity."""
    return expected + bytes(capacity - len(expected))


def test_sync_config_to_a_standby_vcenter_through_the_cli(
    prefect_server, two_sites: tuple[Vcsim, Vcsim, Path], tmp_path: Path
) -> None:
    from helpers import hotvm_json

    from flows.backup_vm import backup_vm
    from hotvm.standby import sync_config

    source_sim, standby_sim, config = two_sites
    backup_vm(vm=VM, config=str(config))

    dr = VSphereHost(host_config(standby_sim, "dr"))
    own = dr.conn.vm(VM)  # the DR site's own VM of that name, at the very path a standby would use
    with pytest.raises(HypervisorError, match="that hotvm did not register"):
        sync_config(config, VM)
    assert own.runtime.powerState == "poweredOn" and own.config.hardware.memoryMB == 32  # untouched
    wait(dr.conn, own.PowerOffVM_Task())
    wait(dr.conn, own.Destroy_Task())

    first = hotvm_json("sync-config", VM, "-c", str(config))
    assert [(r["vm"], r["host"], r["action"], r["started"]) for r in first] == [(VM, "dr", "created", False)]
    copy = dr.conn.vm(VM)
    assert copy.runtime.powerState == "poweredOff" and copy.parent.name == "copies"
    dc = dr.conn.datacenter_of(copy)
    vmx = dr.conn.read(first[0]["location"], dc).decode()
    assert 'uuid.action = "keep"' in vmx and 'uuid.bios = "42 1a' in vmx and "00:50:56:aa:bb:cc" in vmx
    # config only (the seed's shared SAN): the standby uses the VM's own disk, by its absolute path
    assert 'scsi0:0.fileName = "/vmfs/volumes/LocalDS_0/DC0_H0_VM0/disk1.vmdk"' in vmx
    assert 'memsize = "32"' in vmx

    assert [r["action"] for r in hotvm_json("sync-config", VM, "-c", str(config))] == ["unchanged"]

    source = Connection(host_config(source_sim))
    vm = source.vm(VM)
    wait(source, vm.ReconfigVM_Task(vim.vm.ConfigSpec(memoryMB=64)))
    # vcsim 0.24 does not write the .vmx on ReconfigVM (ESX does): write what ESX would have
    source.upload(VMX.replace('memsize = "32"', 'memsize = "64"').encode(), vm.config.files.vmPathName,
                  source.datacenter_of(vm))  # fmt: skip
    source.close()
    second = backup_vm(vm=VM, config=str(config))
    capacity = next(d["bytes"] for d in second["disks"] if d["device"] == "scsi0:0")

    updated = hotvm_json("sync-config", "-c", str(config))  # every VM with a standby_host
    assert [(r["action"], r["backup_id"]) for r in updated] == [("updated", second["backup_id"])]
    assert 'memsize = "64"' in dr.conn.read(updated[0]["location"], dc).decode()
    assert dr.list_vms().count(VM) == 1

    with_disks = hotvm_json("sync-config", VM, "--with-disks", "-c", str(config))
    assert [r["action"] for r in with_disks] == ["updated"]
    vmx = dr.conn.read(with_disks[0]["location"], dc).decode()
    assert f'scsi0:0.fileName = "{VM}.vmdk"' in vmx
    assert dr.conn.read(f"[LocalDS_0] {VM}/{VM}-flat.vmdk", dc) == restored_bytes(SOURCE_DISK, capacity)
    assert [r["action"] for r in hotvm_json("sync-config", VM, "--with-disks", "-c", str(config))] == [
        "unchanged"
    ]
    assert dr.conn.vm(VM).runtime.powerState == "poweredOff"
    assert not (Path.cwd() / "standby").exists()  # vm_dir is a vSphere folder, never a local directory
    assert not (Path(tempfile.gettempdir()) / "hotvm-staging" / "dr" / VM).exists()  # uploaded, removed
    dr.close()


def test_restore_to_a_second_vcenter_through_the_cli(
    prefect_server, two_sites: tuple[Vcsim, Vcsim, Path]
) -> None:
    from helpers import hotvm_json

    from flows.backup_vm import backup_vm

    _, standby_sim, config = two_sites
    backup = backup_vm(vm=VM, config=str(config))
    capacity = next(d["bytes"] for d in backup["disks"] if d["device"] == "scsi0:0")

    result = hotvm_json("restore", VM, "--to-host", "dr", "--name", "copy01", "-c", str(config))
    reg = result["registered"]
    assert (reg["host"], reg["name"], reg["action"], reg["started"], reg["new_identity"]) == (
        "dr", "copy01", "created", False, True
    )  # fmt: skip
    dr = VSphereHost(host_config(standby_sim, "dr"))
    copy = dr.conn.vm("copy01")
    assert copy.runtime.powerState == "poweredOff" and copy.parent.name == "copies"
    dc = dr.conn.datacenter_of(copy)
    vmx = dr.conn.read(reg["location"], dc).decode()
    assert 'displayName = "copy01"' in vmx and 'uuid.action = "create"' in vmx
    assert "uuid.bios" not in vmx and "00:50:56:aa:bb:cc" not in vmx  # a new identity beside the original
    assert dr.conn.read("[LocalDS_0] copy01/copy01-flat.vmdk", dc) == restored_bytes(SOURCE_DISK, capacity)
    assert not (Path.cwd() / "standby").exists()
    assert not (Path(tempfile.gettempdir()) / "hotvm-staging" / "dr" / "copy01").exists()
    dr.close()


def test_file_level_backup_of_a_vsphere_vm_through_the_cli(
    prefect_server, vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real GPT + ext4 disk on the datastore: files backup, find and restore; the second set walks the
    volume again (no CBT in vcsim: dirty_extents says why, and that means "walk it", never a failure)."""
    from fs_images import Node, PartSpec, build_disk, populate
    from helpers import hotvm, hotvm_json

    from hotvm.config import TargetConfig
    from hotvm.files.filesets import FileSets
    from hotvm.formats.repository import Repository
    from targets import open_target

    monkeypatch.setenv("HOTVM_CATALOG_DIR", str(tmp_path / "catalog"))
    report = b"quarterly report\n" * 50
    image = build_disk(tmp_path / "guest.raw", [PartSpec("ext4", 12, [
        Node("/docs", mode=0o750, uid=1000, gid=100, mtime=1_700_000_000),
        Node("/docs/report.txt", report, mode=0o640, uid=1000, gid=100, mtime=1_700_000_000),
        Node("/docs/sales2026.xls", b"sales figures " * 300, mtime=1_700_000_002),
    ])])  # fmt: skip
    conn = Connection(host_config(vcsim))
    vm = conn.vm(VM)
    dc = conn.datacenter_of(vm)
    add_disk(conn, vm, "persistent", size=image.stat().st_size)  # scsi0:1, the guest's data disk
    data_disk = disk_files(vm)["scsi0:1"]
    conn.upload(image, data_disk, dc)
    config = vsphere_config(tmp_path / "hotvm.yaml", vcsim, [VM], f"file://{tmp_path}/target")

    first = hotvm_json("files", "backup", VM, "-c", str(config))
    volumes = {r["volume"]: r for r in first["volumes"]}
    assert volumes["scsi0:1-p1"]["status"] == "ok" and volumes["scsi0:1-p1"]["fstype"] == "ext4"
    assert volumes["scsi0:1-p1"]["files_stored"] == 2
    assert [n for n in snapshot_names(conn, vm) if OVERLAY_MARKER in n] == []

    populate(image, 0, "ext4", [Node("/docs/new.txt", b"brand new file", mtime=1_700_000_100)])
    conn.upload(image, data_disk, dc)  # the guest wrote a file
    second = hotvm_json("files", "backup", VM, "-c", str(config))
    row = next(r for r in second["volumes"] if r["volume"] == "scsi0:1-p1")
    assert second["incremental_from"] == first["backup_id"]
    assert (row["files_seen"], row["files_read"], row["files_stored"]) == (3, 1, 1)  # walked, only new read
    assert not row.get("unchanged_volume")
    repo = Repository(open_target(TargetConfig(name="nas", url=f"file://{tmp_path}/target")))
    baseline = FileSets(repo).load_manifest(VM, first["backup_id"]).disk_bitmaps["scsi0:1"]
    assert baseline == f"hotvm-{first['backup_id']}"  # so the second set asked dirty_extents: no CBT, walked

    found = hotvm_json("files", "find", VM, "*.txt", "-c", str(config))
    assert {(f["path"], f["backup_id"]) for f in found} == {
        ("/scsi0:1-p1/docs/report.txt", first["backup_id"]),
        ("/scsi0:1-p1/docs/report.txt", second["backup_id"]),
        ("/scsi0:1-p1/docs/new.txt", second["backup_id"]),
    }
    out = tmp_path / "out"
    hotvm("files", "restore", VM, "/scsi0:1-p1/docs", "--to", str(out), "-c", str(config))
    restored = out / "scsi0:1-p1" / "docs"
    assert (restored / "report.txt").read_bytes() == report
    assert (restored / "new.txt").read_bytes() == b"brand new file"
    st = (restored / "report.txt").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1000, 100)
    assert [n for n in snapshot_names(conn, vm) if OVERLAY_MARKER in n] == []
    conn.close()

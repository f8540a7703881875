"""The libvirt driver against a real libvirtd (qemu:///system, TCG domains booting the demo guest).

One domain with every kind of disk is backed up once through the real Prefect flow while its guest writes;
the tests then check that backup from every side (XML unchanged, modes, restore, register, reconcile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fs_images import Node, PartSpec, build_disk, populate, to_qcow2
from helpers import hotvm, hotvm_json, write_config
from libvirt_helpers import (
    HEARTBEAT,
    READY,
    URI,
    Disk,
    GuestDomain,
    destroy_and_undefine,
    domain_xml,
    last_heartbeat,
    make_images,
    raw_bytes,
    read_static,
    running_libvirtd,
    shared_dir,
    unique_name,
    wait_beat_past,
    wait_records,
    wait_serial,
)

from hotvm.config import HostConfig, VMConfig
from hotvm.config_file import load_config
from hotvm.errors import (
    BlockJobError,
    DiskNotSupported,
    HypervisorError,
    HypervisorUnreachable,
    UnknownVMError,
    VMNotRunning,
)
from hotvm.guest import verify_ring
from hotvm.guest.artifacts import ensure_guest_files
from hotvm.guest.disk import RING_BYTES
from hotvm.hypervisors import libvirt_xml as lx
from hotvm.hypervisors.base import (
    OVERLAY_MARKER,
    BitmapUnusable,
    DiskMode,
    HypervisorDriver,
    VMDefinition,
)
from hotvm.hypervisors.resolve import find_vm, resolve_vms

libvirt = pytest.importorskip("libvirt")
libvirt_qemu = pytest.importorskip("libvirt_qemu")


def overlays(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if OVERLAY_MARKER in p.name]


def xml_pair(dom) -> tuple[str, str]:
    """(inactive XML, live XML minus libvirt's chain indexes): what must not change across a backup."""
    return (
        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
        lx.strip_volatile(dom.XMLDesc(0)),
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def conn():
    with running_libvirtd():
        c = libvirt.open(URI)
        yield c
        c.close()


@pytest.fixture(scope="module")
def lvdir():
    path = shared_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def boot_files(lvdir):
    files = ensure_guest_files(lvdir / "guest")
    return files.kernel, files.initramfs


@pytest.fixture(scope="module")
def module_domains(conn):
    """Domains of the module's shared fixtures, removed after its last test."""
    names: list[str] = []
    yield names
    for name in names:
        destroy_and_undefine(conn, name)


@pytest.fixture
def domains(conn):
    """Domains one test starts, removed right after it: an idle TCG guest still costs CPU, which the tests
    running beside this module (pytest-xdist) need."""
    names: list[str] = []
    yield names
    for name in names:
        destroy_and_undefine(conn, name)


def start_domain(conn, dom: GuestDomain, boot_files, domains: list[str]):
    domains.append(dom.name)
    d = conn.defineXML(domain_xml(dom, *boot_files))
    d.create()
    wait_serial(dom.serial_log, READY, 90)
    return d


@pytest.fixture(scope="module")
def guest(conn, lvdir, boot_files, module_domains):
    """A running domain: data disk (the ring writer) + one disk of every kind hotvm must skip."""
    name = unique_name()
    d = lvdir / name
    d.mkdir()
    d.chmod(0o755)
    spec = GuestDomain(
        name=name,
        dir=d,
        serial_log=d / f"{name}.serial.log",
        append="hotvm.interval=0.05",
        disks=[
            Disk("vda", d / "data.qcow2", size="32M"),
            Disk("vdb", d / "ro.raw", fmt="raw", size="4M", extra="<readonly/>"),
            Disk("vdc", d / "shared.raw", fmt="raw", size="4M", extra="<shareable/>"),
            Disk("vdd", d / "scratch.qcow2", size="4M", attrs="snapshot='no'"),
            Disk("vde", d / "transient.qcow2", size="4M", extra="<transient/>"),
            Disk("hdc", None, device="cdrom", bus="ide", extra="<readonly/>"),
        ],
    )
    static = make_images(spec)
    dom = start_domain(conn, spec, boot_files, module_domains)
    return spec, dom, static


@pytest.fixture(scope="module")
def backed_up(prefect_server, guest, lvdir, tmp_path_factory):
    """One hot backup through the real flow while the guest writes, then a restore with the real code."""
    from flows.backup_vm import backup_vm
    from flows.restore_vm import restore_vm

    spec, dom, static = guest
    tmp = tmp_path_factory.mktemp("lvbackup")
    config = write_config(
        tmp / "hotvm.yaml", {spec.name: ""}, f"file://{tmp}/target", driver="libvirt", uri=URI
    )
    before = xml_pair(dom)
    seq_before = last_heartbeat(spec.serial_log)
    t0 = time.monotonic()
    result = backup_vm(vm=spec.name, config=str(config))
    seconds = time.monotonic() - t0
    after = xml_pair(dom)
    seq_after = wait_beat_past(spec.serial_log, last_heartbeat(spec.serial_log))  # writes on after the pivot
    restore_to = lvdir / f"{spec.name}-restored"
    restored = restore_vm(vm=spec.name, to=str(restore_to), fmt="qcow2", config=str(config))
    return {
        "result": result, "restored": restored, "restore_to": restore_to, "config": config,
        "before": before, "after": after, "seq": (seq_before, seq_after), "seconds": seconds,
        "static": static, "ring_last": verify_ring(restored["disks"][0]["path"]).last_seq,
    }  # fmt: skip


# --------------------------------------------------------------------------- the backup


def test_backup_while_guest_writes_restores_a_clean_point_in_time(backed_up, guest):
    spec, _, _ = guest
    result = backed_up["result"]
    assert [d["device"] for d in result["disks"]] == ["vda"]
    assert result["pivot_stall_ms"] is not None and result["pivot_stall_ms"] < 5000
    assert [s["name"] for s in result["steps"] if s["device"] == "vda"] == [
        "export", "add_redo", "commit_level1", "commit_final",
    ]  # fmt: skip
    seq_before, seq_after = backed_up["seq"]
    assert seq_after > seq_before, "the guest kept writing through the backup"

    disk = Path(backed_up["restored"]["disks"][0]["path"])
    ring = verify_ring(disk)
    assert ring.consistent, ring.problems
    assert seq_before <= ring.last_seq <= seq_after
    assert read_static(disk, "qcow2") == backed_up["static"]
    config_dir = backed_up["restore_to"] / "config"
    assert (config_dir / "documents" / "domain.xml").read_text().count(f"<name>{spec.name}</name>") == 1
    assert (config_dir / "documents" / "domain-live.xml").exists()
    assert OVERLAY_MARKER not in (config_dir / "documents" / "domain.xml").read_text()


def test_domain_xml_is_exactly_as_before_and_no_overlay_is_left(backed_up, guest):
    spec, dom, _ = guest
    (inactive_before, live_before), (inactive_after, live_after) = backed_up["before"], backed_up["after"]
    assert inactive_after == inactive_before
    assert live_after == live_before
    assert overlays(spec.dir) == []
    assert dom.isActive()


def test_skipped_disks_are_reported_with_their_mode(backed_up, guest):
    spec, _, _ = guest
    warnings = " | ".join(backed_up["result"]["warnings"])
    expected = {"vdb": "read-only", "vdc": "shared", "vdd": "no-snapshot", "vde": "temporary",
                "hdc": "no-writable-file"}  # fmt: skip
    for device, mode in expected.items():
        assert f"skipped {device}" in warnings and mode in warnings, warnings


def test_disk_modes_and_chain_from_the_domain_xml(conn, guest):
    spec, dom, _ = guest
    driver = _driver(spec.name)
    assert isinstance(driver, HypervisorDriver)
    disks = {d.device: d for d in driver.list_disks()}
    assert {k: d.mode for k, d in disks.items()} == {
        "vda": DiskMode.PERSISTENT, "vdb": DiskMode.READ_ONLY, "vdc": DiskMode.SHARED,
        "vdd": DiskMode.NO_SNAPSHOT, "vde": DiskMode.TEMPORARY, "hdc": DiskMode.NO_FILE,
    }  # fmt: skip
    assert disks["vda"].path == str(spec.data) and disks["vda"].virtual_size == 32 << 20
    assert disks["vda"].hotvm_overlays == [] and disks["vda"].backing_chain == []
    assert disks["vde"].path == str(spec.dir / "transient.qcow2")  # not libvirt's throw-away overlay
    for device in ("vdb", "vdc", "vdd", "vde"):
        with pytest.raises(DiskNotSupported, match=device):
            driver.add_redo([device], "t1")
    assert overlays(spec.dir) == []
    driver.close()


def test_users_own_external_snapshot_is_backing_chain_not_ours(conn, lvdir, boot_files, domains):
    """A disk already on the user's external snapshot: hotvm backs up the top, keeps the chain as is."""
    name = unique_name()
    d = lvdir / name
    d.mkdir()
    d.chmod(0o755)
    spec = GuestDomain(name, d, d / f"{name}.serial.log", [Disk("vda", d / "base.qcow2", size="8M")])
    make_images(spec)
    dom = start_domain(conn, spec, boot_files, domains)
    user_top = d / "base.user-snap.qcow2"
    dom.snapshotCreateXML(
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'><source file='{user_top}'/></disk>"
        "</disks></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
    )
    driver = _driver(name)
    (disk,) = driver.list_disks()
    assert (disk.path, disk.backing_chain, disk.mode) == (
        str(user_top),
        [str(spec.data)],
        DiskMode.PERSISTENT,
    )
    frozen = driver.add_redo(["vda"], "u1")[0]
    assert frozen.image == str(user_top) and OVERLAY_MARKER in frozen.overlay
    (disk,) = driver.list_disks()
    assert disk.hotvm_overlays == [frozen.overlay] and disk.backing_chain == [str(spec.data)]
    driver.commit_final("vda")
    (disk,) = driver.list_disks()
    assert (disk.path, disk.hotvm_overlays, disk.backing_chain) == (str(user_top), [], [str(spec.data)])
    driver.close()


# --------------------------------------------------------------------------- incrementals (checkpoints)


def test_second_backup_is_incremental_and_restores_a_clean_point_in_time(backed_up, guest, lvdir):
    from flows.backup_vm import backup_vm
    from flows.restore_vm import restore_vm

    spec, dom, static = guest
    first = backed_up["result"]
    assert first["disks"][0]["bitmap"] == f"hotvm-{first['backup_id']}.vda"
    second = backup_vm(vm=spec.name, config=str(backed_up["config"]))
    disk = second["disks"][0]
    assert disk["incremental_from"] == first["backup_id"], disk["mode"]
    assert 0 < disk["bytes_read"] < first["disks"][0]["bytes_read"]  # the ring's chunk, not the static data
    assert [c.getName() for c in dom.listAllCheckpoints(0)] == [disk["bitmap"]]  # the superseded one is gone
    assert xml_pair(dom) == backed_up["before"] and overlays(spec.dir) == []

    restored = restore_vm(vm=spec.name, to=str(lvdir / f"{spec.name}-incr"), config=str(backed_up["config"]))
    image = Path(restored["disks"][0]["path"])
    ring = verify_ring(image)
    assert ring.consistent, ring.problems
    assert ring.last_seq > verify_ring(backed_up["restored"]["disks"][0]["path"]).last_seq
    assert read_static(image, "qcow2") == static


def test_dirty_extents_cover_every_change_between_two_freeze_points(guest):
    """The checkpoint's bitmap, read on the next frozen image, marks every cluster the guest changed:
    before the first REDO, on the overlays (merged back by the commits) and after the pivot."""
    spec, dom, _ = guest
    driver = _driver(spec.name)
    a = driver.add_redo(["vda"], "ct1", track_changes=True)[0]
    assert a.bitmap == "hotvm-ct1.vda"
    at_a = raw_bytes(a.image, a.format)[: 1 << 20]
    wait_records(spec.serial_log, 17)  # writes (more than a 64 KiB cluster) land in the first overlay ...
    driver.add_redo(["vda"], "ct1")
    wait_records(spec.serial_log, 17)  # ... in the second ...
    driver.commit_level1("vda")
    driver.commit_final("vda")
    wait_records(spec.serial_log, 17)  # ... and in the image again
    b = driver.add_redo(["vda"], "ct2", track_changes=True)[0]
    at_b = raw_bytes(b.image, b.format)[: 1 << 20]
    extents = driver.dirty_extents("vda", a.bitmap)
    driver.commit_final("vda")

    cluster = 64 << 10
    changed = [o for o in range(0, len(at_a), cluster) if at_a[o : o + cluster] != at_b[o : o + cluster]]
    assert len(changed) >= 3, "the guest wrote 3 x 17 records (4 KiB each) in between"
    missed = [o for o in changed if not any(s <= o and o + cluster <= s + n for s, n in extents)]
    assert missed == [], f"clusters changed but not marked dirty: {missed} (extents {extents})"
    assert sum(n for _, n in extents) <= len(changed) * cluster + 4 * cluster  # only what changed (+ margin)

    assert driver.remove_bitmaps("vda", [a.bitmap, b.bitmap]) == [a.bitmap, b.bitmap]
    driver.add_redo(["vda"], "ct3")
    with pytest.raises(BitmapUnusable, match="gone"):
        driver.dirty_extents("vda", a.bitmap)
    driver.commit_final("vda")
    driver.close()


# --------------------------------------------------------------------------- restore to a new domain


def _definition(backed_up, new_name: str, new_identity: bool = True) -> VMDefinition:
    config_dir = backed_up["restore_to"] / "config"
    docs = {p.name: p.read_bytes() for p in (config_dir / "documents").iterdir()}
    return VMDefinition(
        name=new_name, source_vm=backed_up["result"]["vm"], source_driver="libvirt", documents=docs, files={},
        description={}, disks={d["device"]: Path(d["path"]) for d in backed_up["restored"]["disks"]},
        new_identity=new_identity,
    )  # fmt: skip


def test_restored_disk_registers_as_a_new_domain_that_boots(conn, backed_up, guest, domains):
    from hotvm.hypervisors.libvirt import LibvirtHost

    spec, original, _ = guest
    new_name = unique_name("hotvm-lv-copy")
    domains.append(new_name)
    ring_last = verify_ring(backed_up["restored"]["disks"][0]["path"]).last_seq
    host = LibvirtHost(HostConfig(name="kvm", driver="libvirt", uri=URI))
    first = host.register_vm(_definition(backed_up, new_name), start=True)
    assert (first.action, first.started) == ("created", True)
    copy = conn.lookupByName(new_name)
    root = lx.parse(copy.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert copy.UUIDString() != original.UUIDString()
    assert [n["mac"] for n in lx.nics(root)] != [spec.mac]
    targets = {d.target: d for d in lx.disks(root)}
    restored = backed_up["restored"]["disks"][0]["path"]
    assert targets["vda"].layers[0].path == restored
    assert "vdd" not in targets, "a writable disk that was not restored must not be shared with the original"
    serial = Path(root.find("./devices/serial/source").get("path"))
    assert new_name in serial.name
    ready = wait_serial(serial, READY, 90)
    assert int(ready.group(1)) == ring_last  # the copy found the restored records on its disk
    wait_serial(serial, HEARTBEAT, 30, start=ready.end())  # ... and writes again

    again = host.register_vm(_definition(backed_up, new_name))
    assert again.action == "unchanged"
    bigger = _definition(backed_up, new_name)
    xml = bigger.documents["domain.xml"].decode()
    assert "<memory unit='KiB'>262144</memory>" in xml
    bigger.documents["domain.xml"] = xml.replace("262144", "327680").encode()
    assert host.register_vm(bigger).action == "updated"  # the persistent definition; it applies at next boot
    persistent = conn.lookupByName(new_name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<memory unit='KiB'>327680</memory>" in persistent
    assert host.register_vm(_definition(backed_up, new_name)).action == "updated"
    assert conn.lookupByName(new_name).UUIDString() == copy.UUIDString()
    assert host.list_vms().count(new_name) == 1

    # the restored disks never replace those of a domain that runs under that name
    with pytest.raises(HypervisorError, match="runs on"):
        host.register_vm(_definition(backed_up, spec.name, new_identity=False))
    assert original.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == backed_up["before"][0]
    host.close()


# --------------------------------------------------------------------------- crash, errors, discovery


def test_reconcile_commits_back_what_a_crashed_run_left(guest):
    spec, dom, _ = guest
    before = xml_pair(dom)
    crashed = _driver(spec.name)
    crashed.add_redo(["vda"], "crash1")
    crashed.add_redo(["vda"], "crash1")
    crashed.close()  # the run dies here: the domain writes to the second overlay
    assert len(overlays(spec.dir)) == 2
    assert OVERLAY_MARKER in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    seq = last_heartbeat(spec.serial_log)

    orphan = spec.data.with_name(f"data.qcow2{OVERLAY_MARKER}older-1.qcow2")  # a crash after a commit
    orphan.write_bytes(b"")

    driver = _driver(spec.name)
    actions = driver.reconcile()
    assert [(a.device, len(a.overlays)) for a in actions if "committed" in a.action] == [("vda", 2)]
    assert [a.overlays for a in actions if "no chain uses" in a.action] == [[str(orphan)]]
    assert xml_pair(dom) == before
    assert overlays(spec.dir) == []
    assert driver.reconcile() == []
    deadline = time.monotonic() + 30
    while last_heartbeat(spec.serial_log) <= seq:  # the guest writes on, to its original image
        assert time.monotonic() < deadline, "the guest stopped writing after reconcile"
        time.sleep(0.2)
    driver.close()


def test_commit_past_its_timeout_is_cancelled_and_reconcile_restores_the_chain(guest):
    """job_timeout_s far below what a commit takes: the job is cancelled (or, if it won the race, done);
    either way the disk holds every write and reconcile brings back the original chain."""
    spec, dom, _ = guest
    before = xml_pair(dom)
    hasty = _driver(spec.name, job_timeout_s=1e-6)
    hasty.add_redo(["vda"], "to1")
    time.sleep(0.3)
    hasty.add_redo(["vda"], "to1")
    time.sleep(0.3)
    try:
        hasty.commit_level1("vda")
    except BlockJobError as exc:
        assert "cancelled" in exc.message and exc.hint
    hasty.close()
    driver = _driver(spec.name)
    driver.reconcile()
    assert xml_pair(dom) == before and overlays(spec.dir) == []
    driver.close()


def test_quiesce_without_guest_agent_fails_cleanly(guest):
    spec, dom, _ = guest
    before = xml_pair(dom)
    driver = _driver(spec.name)
    with pytest.raises(HypervisorError, match="cannot be quiesced: .*agent.*nothing was changed"):
        driver.add_redo(["vda"], "q1", quiesce=True)
    assert xml_pair(dom) == before and overlays(spec.dir) == []
    driver.close()


def test_overlay_dir_holds_the_overlays(guest, lvdir):
    spec, dom, _ = guest
    before = xml_pair(dom)
    where = lvdir / "overlays"
    where.mkdir(mode=0o755, exist_ok=True)
    driver = _driver(spec.name, overlay_dir=where)
    frozen = driver.add_redo(["vda"], "od1")[0]
    assert Path(frozen.overlay).parent == where and frozen.image == str(spec.data)
    assert frozen.consistency == "crash"
    assert driver.list_disks()[0].hotvm_overlays == [frozen.overlay]
    driver.commit_final("vda")
    assert xml_pair(dom) == before and overlays(where) == []
    driver.close()


def test_quiesced_backup_freezes_the_guest_through_its_agent(prefect_server, conn, lvdir, domains, tmp_path):
    """Debian's qemu-ga in the demo guest (agent variant): a `quiesce: true` policy makes the flow's first
    REDO use libvirt's QUIESCE flag, which freezes the guest's ext4 disk around the snapshot only; the
    backup is application-consistent and the guest's appends resume."""
    from flows.backup_vm import backup_vm
    from hotvm.guest.initramfs import QEMU_GA
    from hotvm.guest.vm import FS_DISK, create_vm

    if not (QEMU_GA.exists() and shutil.which("mkfs.ext4")):
        pytest.skip("needs qemu-guest-agent and e2fsprogs")
    name = unique_name("hotvm-lv-qa")
    vm = create_vm(name, data_size="8M", state_dir=lvdir / "agent", agent=True)
    spec = GuestDomain(
        name, vm.dir, vm.dir / "serial.log", [Disk("vda", vm.disk), Disk("vdb", vm.dir / FS_DISK, fmt="raw")],
        agent=True,
    )  # fmt: skip
    kernel = next(vm.dir.glob("vmlinu*"))
    domains.append(name)
    dom = conn.defineXML(domain_xml(spec, kernel, vm.dir / "initramfs.cpio.gz"))
    dom.create()
    wait_serial(spec.serial_log, re.compile(r"HOTVM-FSBEAT seq=\d+"), 90)
    deadline = time.monotonic() + 60
    while "state='connected'" not in dom.XMLDesc(0):  # libvirt saw qemu-ga answer on the channel
        assert time.monotonic() < deadline, "the guest agent never connected"
        time.sleep(0.2)

    config = tmp_path / "hotvm.yaml"
    config.write_text(
        yaml.safe_dump({
            "hosts": [{"name": "kvm", "driver": "libvirt", "uri": URI, "vms": [{"name": name}]}],
            "targets": [{"name": "nas", "url": f"file://{tmp_path}/target"}],
            "policies": [{"name": "app", "vms": ["*"], "quiesce": True}],
        })
    )  # fmt: skip
    log_at = spec.serial_log.stat().st_size
    result = backup_vm(vm=name, config=str(config))
    assert result["consistency"] == "application"
    assert {d["device"] for d in result["disks"]} == {"vda", "vdb"}
    log = spec.serial_log.read_bytes().decode(errors="replace")
    assert "qemu-ga: info: guest-fsfreeze called" in log[log_at:]
    status = libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-fsfreeze-status"}', 10, 0)
    assert '"thawed"' in status
    wait_serial(spec.serial_log, re.compile(r"HOTVM-FSBEAT seq=\d+"), 30, start=len(log))  # writes resume
    assert overlays(vm.dir) == []


def test_config_documents_and_files(guest):
    spec, dom, _ = guest
    driver = _driver(spec.name)
    docs = driver.config_documents()
    assert docs["domain.xml"].decode() == dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<backingStore" in docs["domain-live.xml"].decode() or "index=" in docs["domain-live.xml"].decode()
    assert Path(f"/var/log/libvirt/qemu/{spec.name}.log") in driver.config_files()
    info = driver.describe_vm()
    assert (info["name"], info["uuid"], info["vcpus"]) == (spec.name, dom.UUIDString(), 1)
    assert info["memory_bytes"] == 256 << 20 and info["nics"][0]["mac"] == spec.mac
    driver.close()


def test_cli_status_and_inventory_read_the_domain(backed_up, guest):
    spec, _, _ = guest
    config = str(backed_up["config"])
    (row,) = json.loads(hotvm("status", "--config", config, "--json").stdout)
    assert row["state"] == "running" and row["jobs"] == []
    modes = {d["device"]: d["mode"] for d in row["disks"]}
    assert modes["vda"] == "persistent" and modes["vdc"] == "shared"
    assert all(not d["hotvm_overlays"] for d in row["disks"])
    inventory = json.loads(hotvm("inventory", "--config", config, "--format", "json").stdout)
    (vm,) = inventory["vms"]
    assert (vm["name"], vm["driver"], vm["cpus"], vm["memory_bytes"]) == (spec.name, "libvirt", 1, 256 << 20)
    assert [n["mac"] for n in vm["nics"]] == [spec.mac] and [c["device"] for c in vm["cdroms"]] == ["hdc"]
    data = next(d for d in vm["disks"] if d["device"] == "vda")
    assert data["path"] == str(spec.data) and data["allocated_bytes"] > 0


def test_errors_name_the_domain_and_the_fix(conn, lvdir, boot_files, domains, guest):
    spec, _, _ = guest
    with pytest.raises(UnknownVMError, match=rf"no domain 'nope'.*{spec.name}"):
        _driver("nope").list_disks()
    with pytest.raises(HypervisorUnreachable, match="cannot connect to libvirt"):
        _driver(spec.name, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock").list_disks()
    name = unique_name()
    domains.append(name)
    off = GuestDomain(name, lvdir, lvdir / f"{name}.log", [Disk("vda", lvdir / f"{name}.qcow2")])
    conn.defineXML(domain_xml(off, *boot_files))
    with pytest.raises(VMNotRunning, match="not running"):
        _driver(name).add_redo(["vda"], "x")


def test_remote_uri_over_ssh_with_shared_storage(guest):
    """A qemu+ssh:// URI (sshd on loopback, to this very host: storage shared at the same paths). Every
    libvirt call goes over ssh; the frozen image is read here; nvram and logs are not copied.
    (qemu+libssh:// hung here on replies of a few kB, such as the domain XML: use qemu+ssh://.)"""
    from servers import SshServer

    spec, dom, _ = guest
    before = xml_pair(dom)
    with SshServer() as ssh:
        wrapper = ssh.dir / "ssh"  # the test's own known_hosts, not root's ~/.ssh
        wrapper.write_text(
            f'#!/bin/sh\nexec ssh -o UserKnownHostsFile={ssh.known_hosts} -o BatchMode=yes "$@"\n'
        )
        wrapper.chmod(0o755)
        uri = f"qemu+ssh://root@127.0.0.1:{ssh.port}/system?keyfile={ssh.client_key}&command={wrapper}"
        driver = _driver(spec.name, uri=uri)
        assert {d.device: d.mode for d in driver.list_disks()}["vda"] is DiskMode.PERSISTENT
        frozen = driver.add_redo(["vda"], "ssh1")[0]
        with driver.open_frozen_image(frozen) as local:
            ring = verify_ring(raw_bytes(local.image, local.format)[:RING_BYTES])
        assert ring.consistent and ring.last_seq > 0
        driver.commit_final("vda")
        assert driver.config_files() == [] and driver.describe_vm()["libvirt_uri"] == uri
        elsewhere = dataclasses.replace(frozen, image="/nonexistent/on-the-remote-host.qcow2")
        with (
            pytest.raises(HypervisorError, match="not readable on this machine"),
            driver.open_frozen_image(elsewhere),
        ):
            pass
        driver.close()
    assert xml_pair(dom) == before and overlays(spec.dir) == []


def test_host_without_vms_discovers_its_domains(guest, tmp_path):
    spec, _, _ = guest
    cfg = tmp_path / "hotvm.yaml"
    cfg.write_text(
        f"hosts:\n  - name: kvm\n    driver: libvirt\n    uri: {URI}\n"
        f"targets:\n  - name: nas\n    url: file://{tmp_path}/t\n"
    )
    config = load_config(cfg)
    resolved = resolve_vms(config)
    assert spec.name in [vm.name for vm in resolved.of_host("kvm")] and resolved.failures == []
    host, vm = find_vm(config, spec.name)
    assert (host.name, vm.name) == ("kvm", spec.name)


def _driver(name: str, uri: str = URI, **host: object):
    from hotvm.hypervisors.libvirt import LibvirtDriver

    return LibvirtDriver(VMConfig(name=name), HostConfig(name="kvm", driver="libvirt", uri=uri, **host))


# --------------------------------------------------------------------------- daily file-level backups

FILES_T0, FILES_T1 = 1_700_000_000, 1_710_000_000
FILES_EXT4 = [
    Node("/etc/app.conf", b"setting=1\n" * 40, mtime=FILES_T0),
    Node("/data/keep.bin", bytes(range(256)) * 1200, mtime=FILES_T0),
    Node("/data/edit.txt", b"version 1\n" * 100, mtime=FILES_T0),
]
FILES_VFAT = [Node("/CFG/BOOT.TXT", b"fat config " * 50, mtime=FILES_T0)]
FILES_CHANGED = [
    Node("/data/edit.txt", b"version 2\n" * 100, mtime=FILES_T1),
    Node("/data/new.txt", b"added while the domain was shut off", mtime=FILES_T1),
]


@contextlib.contextmanager
def writable_export(image: Path) -> Iterator[Path]:
    """The qcow2's guest bytes as a writable FUSE file (qemu-storage-daemon): writes go through QEMU's
    block layer, so the image's enabled persistent bitmaps (libvirt's checkpoints) record them, as they
    would record the guest's own writes."""
    mountpoint = image.with_suffix(".fuse")
    mountpoint.touch()
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={image},node-name=f",
         "--blockdev", "driver=qcow2,file=f,node-name=q",
         "--export", f"type=fuse,id=e,node-name=q,mountpoint={mountpoint},writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "qsd exited"
            assert time.monotonic() < deadline, "qemu-storage-daemon did not export the image"
            time.sleep(0.02)
        yield mountpoint
    finally:
        proc.terminate()  # stores the bitmaps in the qcow2 and unmounts
        proc.wait(30)
        mountpoint.unlink(missing_ok=True)


def checkpoints(dom) -> list[str]:
    return sorted(c.getName() for c in dom.listAllCheckpoints(0))


def test_daily_file_backups_of_a_libvirt_domain_use_its_checkpoints(
    prefect_server, conn, lvdir, boot_files, domains, monkeypatch
):
    """Two `hotvm files backup` runs of a running domain with a GPT (ext4 + vfat) data disk, the ext4 changed
    in between through QEMU's block layer while the domain was off: the second run walks only the ext4
    (the checkpoint's bitmap shows the vfat untouched), reads only the changed files; find/restore return
    the exact bytes of each set; a checkpoint the user deleted means "walk every volume", not a failure."""
    monkeypatch.setenv("HOTVM_CATALOG_DIR", str(lvdir / "catalog"))
    monkeypatch.setenv("HOTVM_LOCK_DIR", str(lvdir / "locks"))
    name = unique_name("hotvm-lv-files")
    d = lvdir / name
    d.mkdir()
    d.chmod(0o755)
    files_disk = d / "files.qcow2"
    spec = GuestDomain(
        name, d, d / f"{name}.serial.log",
        [Disk("vda", d / "ring.qcow2", size="8M"), Disk("vdb", files_disk)],
    )  # fmt: skip
    make_images(spec)
    raw = build_disk(d / "files.raw", [PartSpec("ext4", 16, FILES_EXT4), PartSpec("vfat", 16, FILES_VFAT)])
    files_disk.unlink()
    to_qcow2(raw, files_disk)
    raw.unlink()
    dom = start_domain(conn, spec, boot_files, domains)
    config = d / "hotvm.yaml"
    config.write_text(
        f"hosts:\n  - name: kvm-files\n    driver: libvirt\n    uri: {URI}\n    vms:\n"
        f"      - name: {name}\n        exclude_disks: [vda]\n"
        f"targets:\n  - name: nas\n    url: file://{d}/target\n"
    )
    cfg = ("-c", str(config))

    before = xml_pair(dom)
    first = hotvm_json("files", "backup", name, *cfg)
    vols = {v["volume"]: v for v in first["volumes"]}
    assert {k: (v["status"], v["fstype"]) for k, v in vols.items()} == {
        "vdb-p1": ("ok", "ext4"), "vdb-p2": ("ok", "vfat"),
    }  # fmt: skip
    assert (vols["vdb-p1"]["files_stored"], vols["vdb-p2"]["files_stored"]) == (3, 1)
    assert xml_pair(dom) == before and overlays(d) == []
    assert checkpoints(dom) == [f"hotvm-{first['backup_id']}.vdb"]  # what an image backup also keeps
    image = hotvm_json("backup", name, *cfg)  # the weekly image of the same domain, its own checkpoint
    image_cp = f"hotvm-{image['backup_id']}.vdb"
    assert checkpoints(dom) == sorted([f"hotvm-{first['backup_id']}.vdb", image_cp])

    dom.destroy()  # QEMU stores the checkpoint's bitmap in the image as it exits
    with writable_export(files_disk) as disk:
        populate(disk, 0, "ext4", FILES_CHANGED)
    dom.create()
    before = xml_pair(dom)
    second = hotvm_json("files", "backup", name, *cfg)
    vols2 = {v["volume"]: v for v in second["volumes"]}
    assert second["incremental_from"] == first["backup_id"]
    assert vols2["vdb-p2"]["unchanged_volume"] and vols2["vdb-p2"]["files_read"] == 0  # not walked
    assert not vols2["vdb-p1"]["unchanged_volume"]
    assert (vols2["vdb-p1"]["files_read"], vols2["vdb-p1"]["files_stored"]) == (2, 2)
    assert vols2["vdb-p1"]["bytes_new"] == sum(len(n.data) for n in FILES_CHANGED)
    assert xml_pair(dom) == before and overlays(d) == []
    assert checkpoints(dom) == sorted([f"hotvm-{second['backup_id']}.vdb", image_cp])  # files' 1st is gone

    # find / restore: each set exactly as it was
    found = hotvm_json("files", "find", name, "edit.txt", *cfg)
    assert sorted((r["backup_id"], r["size"]) for r in found) == [
        (first["backup_id"], len(FILES_EXT4[2].data)), (second["backup_id"], len(FILES_CHANGED[0].data)),
    ]  # fmt: skip
    out1, out2 = d / "out1", d / "out2"
    hotvm("files", "restore", name, "/vdb-p1/data", "/vdb-p2", "--to", str(out1),
          "--backup", first["backup_id"], *cfg)  # fmt: skip
    hotvm("files", "restore", name, "/vdb-p1/data", "--to", str(out2), *cfg)
    assert (out1 / "vdb-p1/data/edit.txt").read_bytes() == FILES_EXT4[2].data
    assert (out1 / "vdb-p1/data/keep.bin").read_bytes() == FILES_EXT4[1].data
    assert not (out1 / "vdb-p1/data/new.txt").exists()
    assert (out1 / "vdb-p2/CFG/BOOT.TXT").read_bytes() == FILES_VFAT[0].data
    assert (out2 / "vdb-p1/data/edit.txt").read_bytes() == FILES_CHANGED[0].data
    assert (out2 / "vdb-p1/data/new.txt").read_bytes() == FILES_CHANGED[1].data
    assert (out2 / "vdb-p1/data/keep.bin").read_bytes() == FILES_EXT4[1].data

    # the user deletes hotvm's checkpoint: the next set walks every volume (BitmapUnusable), and still
    # reads only what changed (nothing)
    dom.checkpointLookupByName(f"hotvm-{second['backup_id']}.vdb").delete(0)
    third = hotvm_json("files", "backup", name, *cfg)
    vols3 = {v["volume"]: v for v in third["volumes"]}
    assert [v["status"] for v in vols3.values()] == ["ok", "ok"]
    assert not any(v["unchanged_volume"] for v in vols3.values())
    assert sum(v["files_read"] for v in vols3.values()) == 0
    assert checkpoints(dom) == sorted([f"hotvm-{third['backup_id']}.vdb", image_cp]) and overlays(d) == []

    # the image chain's checkpoint outlived the file sets' (its parent) being deleted: still incremental
    image2 = hotvm_json("backup", name, *cfg)
    (disk,) = image2["disks"]
    assert disk["incremental_from"] == image["backup_id"], disk["mode"]
    assert disk["bytes_reused"] > 0  # chunks the bitmap shows untouched: not read (a full read reuses none)
    assert checkpoints(dom) == sorted([f"hotvm-{third['backup_id']}.vdb", f"hotvm-{image2['backup_id']}.vdb"])


# --------------------------------------------------------------------------- restore --to-host (CLI)


def test_cli_restore_to_a_libvirt_host_defines_a_new_domain_that_boots(
    conn, backed_up, guest, lvdir, domains
):
    """`hotvm restore VM --to-host H --name copy01 --start`: the disks go into H's vm_dir (traversable by
    libvirt-qemu, like every fixture directory here), a new domain with a new UUID and MAC runs on them and
    boots; the same command again changes nothing (the running copy's disks are not rewritten)."""
    spec, original, _ = guest
    cfg = yaml.safe_load(backed_up["config"].read_text())
    vm_dir = lvdir / "host-dr"
    vm_dir.mkdir(mode=0o755)
    cfg["hosts"].append({"name": "kvm-dr", "driver": "libvirt", "uri": URI, "vm_dir": str(vm_dir)})
    config = backed_up["config"].with_name("to-host.yaml")
    config.write_text(yaml.safe_dump(cfg))
    copy = unique_name("copy01")
    domains.append(copy)
    backup_id = backed_up["result"]["backup_id"]  # whose restored ring the test knows (others may follow)
    args = ("restore", spec.name, "--backup", backup_id, "--to-host", "kvm-dr", "--name", copy, "--start",
            "-c", str(config))  # fmt: skip

    first = hotvm_json(*args)
    reg = first["registered"]
    assert (reg["host"], reg["name"], reg["action"], reg["started"], reg["new_identity"]) == (
        "kvm-dr", copy, "created", True, True,
    )  # fmt: skip
    disk = Path(first["disks"][0]["path"])
    assert disk.parent == vm_dir / copy / f"disks-{backup_id}"
    dom = conn.lookupByName(copy)
    root = lx.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert dom.isActive() and dom.UUIDString() != original.UUIDString()
    assert [n["mac"] for n in lx.nics(root)] != [spec.mac]
    targets = {d.target: d.layers[0].path for d in lx.disks(root) if d.device == "disk"}
    assert targets["vda"] == str(disk)
    assert "vdd" not in targets and "vde" not in targets  # writable, not restored: never shared
    serial = Path(root.find("./devices/serial/source").get("path"))
    ready = wait_serial(serial, READY, 90)
    assert int(ready.group(1)) == backed_up["ring_last"]  # the copy found the backed-up records

    again = hotvm_json(*args)["registered"]
    assert (again["action"], again["started"]) == ("unchanged", False)
    assert conn.lookupByName(copy).UUIDString() == dom.UUIDString() and dom.isActive()


# --------------------------------------------------------------------------- sync-config, 2nd libvirt host


@pytest.fixture(scope="module")
def second_libvirtd() -> Iterator[str]:
    """A second, independent libvirt host on this machine: a session-mode libvirtd run as `nobody` with its
    own socket, domain registry and state (all under one temp dir). Root may connect to any user's
    socket, so hotvm reaches it as qemu+unix:///session?socket=... like any other host's URI."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("a second libvirtd as another user needs root and setpriv")
    home = shared_dir("hotvm-libvirt2-")
    shutil.chown(home, "nobody", "nogroup")
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": f"{home}/run", "XDG_CONFIG_HOME": f"{home}/config",
           "XDG_CACHE_HOME": f"{home}/cache", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # fmt: skip
    proc = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "libvirtd"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    uri = f"qemu+unix:///session?socket={home}/run/libvirt/libvirt-sock"
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["virsh", "-c", uri, "uri"], capture_output=True, timeout=20).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("the second (session) libvirtd did not start")
            time.sleep(0.2)
        yield uri
    finally:
        proc.terminate()  # setpriv exec'd libvirtd: this is the daemon's own pid
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def test_sync_config_registers_a_standby_on_a_second_libvirt_host(backed_up, guest, lvdir, second_libvirtd):
    """`hotvm sync-config --with-disks` from the target to the standby host: the same domain (name, UUID,
    MACs), powered off, on the latest backup's restored disk; a rerun is "unchanged". The original keeps
    running on its own host, untouched."""
    spec, original, _ = guest
    cfg = yaml.safe_load(backed_up["config"].read_text())
    standby_dir = lvdir / "host-standby"
    standby_dir.mkdir(mode=0o755)
    (source,) = cfg["hosts"]
    source["vms"][0]["standby_host"] = "kvm2"
    cfg["hosts"].append(
        {"name": "kvm2", "driver": "libvirt", "uri": second_libvirtd, "vm_dir": str(standby_dir)}
    )
    config = backed_up["config"].with_name("standby.yaml")
    config.write_text(yaml.safe_dump(cfg))
    before = xml_pair(original)

    (row,) = hotvm_json("sync-config", "--with-disks", "-c", str(config))
    assert (row["vm"], row["host"], row["action"], row["started"]) == (spec.name, "kvm2", "created", False)
    restored = Path(row["disks"]["vda"])
    assert restored.parent == standby_dir / spec.name / f"disks-{row['backup_id']}"  # the latest set
    assert read_static(restored, "qcow2") == backed_up["static"]
    other = libvirt.open(second_libvirtd)
    try:
        standby = other.lookupByName(spec.name)
        root = lx.parse(standby.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert not standby.isActive()
        assert standby.UUIDString() == original.UUIDString()  # the same VM, ready to replace it
        assert [n["mac"] for n in lx.nics(root)] == [spec.mac]
        assert {d.target: d.layers[0].path for d in lx.disks(root) if d.layers}["vda"] == str(restored)
        again = hotvm_json("sync-config", spec.name, "--with-disks", "-c", str(config))
        assert [(r["action"], r["started"]) for r in again] == [("unchanged", False)]
        standby.undefine()
    finally:
        other.close()
    assert xml_pair(original) == before and original.isActive()

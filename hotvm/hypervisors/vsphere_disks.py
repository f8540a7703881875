"""Reading vSphere disks and hotvm's snapshots: names, disk modes, the files a snapshot froze."""

from __future__ import annotations

import re
from pathlib import Path

from pyVmomi import vim

from hotvm.hypervisors.base import OVERLAY_MARKER, DiskMode
from hotvm.hypervisors.vsphere_conn import Connection

_CONTROLLER_PREFIX = (
    (vim.vm.device.VirtualSCSIController, "scsi"),
    (vim.vm.device.VirtualIDEController, "ide"),
    (vim.vm.device.VirtualSATAController, "sata"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
)
_EXTENT = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\S+\s+"([^"]+)"', re.MULTILINE)
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
SPARSE_MAGIC = b"KDMV"


def disk_device_name(disk: vim.vm.device.VirtualDisk, devices: list) -> str:
    """'scsi0:1', as the .vmx names the disk: stable across reboots and snapshots, and what users know."""
    controller = next((d for d in devices if d.key == disk.controllerKey), None)
    for kind, prefix in _CONTROLLER_PREFIX:
        if isinstance(controller, kind):
            return f"{prefix}{controller.busNumber}:{disk.unitNumber}"
    return f"disk{disk.key}"


def disk_mode(disk: vim.vm.device.VirtualDisk) -> tuple[DiskMode, str]:
    """The seed's disk mode check: only persistent (snapshot-able) disks are backed up."""
    backing = disk.backing
    if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
        if backing.compatibilityMode == "physicalMode":
            return DiskMode.NO_SNAPSHOT, "physical-mode RDM (raw LUN): VM snapshots do not include it"
    elif not isinstance(backing, vim.vm.device.VirtualDevice.FileBackingInfo):
        return DiskMode.NO_FILE, f"{type(backing).__name__.rsplit('.', 1)[-1]} backing is not a VMDK file"
    mode = getattr(backing, "diskMode", "persistent") or "persistent"
    if mode == "persistent":
        return DiskMode.PERSISTENT, ""
    if mode == "independent_persistent":
        return DiskMode.NO_SNAPSHOT, "independent_persistent: VM snapshots do not include independent disks"
    if mode in ("independent_nonpersistent", "nonpersistent", "undoable"):
        return DiskMode.TEMPORARY, f"{mode}: its writes are thrown away at power off"
    return DiskMode.NO_FILE, f"disk mode {mode} is not supported"


def snapshot_trees(conn: Connection, vm: vim.VirtualMachine) -> list[vim.vm.SnapshotTree]:
    """Every snapshot of the VM (users' and hotvm's), parents before children."""
    info = conn.props(vm, ["snapshot"]).get("snapshot")
    found, stack = [], list(reversed(info.rootSnapshotList)) if info else []
    while stack:
        tree = stack.pop()
        found.append(tree)
        stack.extend(reversed(tree.childSnapshotList or []))
    return found


def hotvm_snapshots(
    conn: Connection, vm: vim.VirtualMachine
) -> list[tuple[vim.vm.SnapshotTree, vim.vm.Snapshot]]:
    """hotvm's own snapshots (name carries OVERLAY_MARKER), oldest first."""
    found = [tree for tree in snapshot_trees(conn, vm) if tree.name.startswith(OVERLAY_MARKER)]
    return [(tree, tree.snapshot) for tree in sorted(found, key=lambda t: (t.createTime, t.id))]


def snapshot_disk_file(snapshot: vim.vm.Snapshot, key: int) -> str | None:
    """The disk file a snapshot froze: the disk's file in the snapshot's own config."""
    for device in snapshot.config.hardware.device:
        if device.key == key and isinstance(device, vim.vm.device.VirtualDisk):
            return getattr(device.backing, "fileName", None)
    return None


class freeze_devices:  # noqa: N801 - a namespace for the two halves of one tiny format
    """The disks a freeze-point snapshot froze, in export order, kept in the snapshot's description (so the
    driver stays stateless: any later step or run reads it from vSphere)."""

    PREFIX = "hotvm-disks: "

    @classmethod
    def render(cls, devices: list[str]) -> str:
        return cls.PREFIX + ",".join(devices)

    @classmethod
    def parse(cls, description: str | None) -> list[str]:
        text = description or ""
        at = text.find(cls.PREFIX)
        rest = text[at + len(cls.PREFIX) :].strip() if at >= 0 else ""
        return [d for d in rest.split()[0].split(",") if d] if rest else []


def local_disk_format(path: Path) -> tuple[str, list[str]]:
    """(qemu-img format, flat extent files to fetch beside it) of a downloaded VMDK.

    A descriptor names its flat extents; a hosted sparse VMDK starts with KDMV; anything else is the raw
    disk itself (vcsim's disk files hold whatever was uploaded)."""
    with open(path, "rb") as fh:
        head = fh.read(64 * 1024)
    if head.startswith(DESCRIPTOR_MAGIC):
        text = head.decode("utf-8", "replace")
        return "vmdk", [e.rsplit("/", 1)[-1] for e in _EXTENT.findall(text)]
    if head.startswith(SPARSE_MAGIC):
        return "vmdk", []
    return "raw", []

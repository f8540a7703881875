"""vSphere driver: the seed's REDO cycle as VM snapshots, over pyVmomi (vCenter or a single ESXi).

    add_redo       CreateSnapshot_Task(memory=False, quiesce=...) named OVERLAY_MARKER + tag + "-1":
                   the disk files below it are frozen (writes go to new delta files)
    export         the frozen base disk, downloaded from the datastore over HTTPS (open_frozen_image)
    add_redo       a second snapshot "-2"
    commit level 1 RemoveSnapshot_Task of the first (its delta merges into the base, the guest writes on)
    commit final   RemoveSnapshot_Task of the second (+ ConsolidateVMDisks_Task when vSphere asks for it)

A snapshot is VM-wide, while the flow walks the disks one by one: the first snapshot (the freeze point)
stays until the LAST disk it froze has been exported (its description lists the disks, in order), so every
disk is read from the same instant. hotvm only ever removes snapshots whose name carries OVERLAY_MARKER.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from pyVmomi import vim, vmodl

from hotvm.config import HostConfig, VMConfig
from hotvm.errors import DiskNotSupported, HypervisorError
from hotvm.hypervisors.base import (
    OVERLAY_MARKER,
    BitmapUnusable,
    Capability,
    CommitResult,
    DiskInfo,
    DiskMode,
    FrozenDisk,
    HypervisorDriver,
    ReconcileAction,
    bitmap_name,
)
from hotvm.hypervisors.vsphere_conn import Connection, LazyConnection, parse_ds_path
from hotvm.hypervisors.vsphere_disks import (
    disk_device_name,
    disk_mode,
    freeze_devices,
    hotvm_snapshots,
    local_disk_format,
    snapshot_disk_file,
    snapshot_trees,
)
from hotvm.hypervisors.vsphere_host import VSphereHost
from hotvm.hypervisors.vsphere_question import answer_single_choice

log = logging.getLogger("hotvm.vsphere")

__all__ = ["VSphereDriver", "VSphereHost"]

CHANGE_ID_SEP = "@"


class VSphereDriver(LazyConnection, HypervisorDriver):
    """HypervisorDriver for one VM of a vCenter/ESXi host."""

    name = "vsphere"
    capabilities = frozenset({Capability.CONFIG_DOCUMENTS, Capability.REMOTE_IMAGES})

    def __init__(self, vm: VMConfig, host: HostConfig) -> None:
        super().__init__(host)
        self.vm = vm

    def _vm(self) -> vim.VirtualMachine:
        return self.conn.vm(self.vm.name)

    def _ask(self, vm: vim.VirtualMachine) -> None:
        """Before and while every step: answer a single-choice question, fail on a multiple-choice one."""
        answer_single_choice(vm, self.vm.name)

    def _run(self, vm: vim.VirtualMachine, task: vim.Task, what: str) -> object:
        return self.conn.wait(task, what, self.host.job_timeout_s, between=lambda: self._ask(vm)).result

    # ------------------------------------------------------------------ inventory

    def _disks(self, vm: vim.VirtualMachine) -> list[tuple[vim.vm.device.VirtualDisk, str]]:
        devices = list(vm.config.hardware.device)
        return [
            (d, disk_device_name(d, devices)) for d in devices if isinstance(d, vim.vm.device.VirtualDisk)
        ]

    def list_disks(self) -> list[DiskInfo]:
        vm = self._vm()
        snaps = hotvm_snapshots(self.conn, vm)
        disks = []
        for disk, device in self._disks(vm):
            mode, why = disk_mode(disk)
            if mode is not DiskMode.PERSISTENT:
                log.warning("VM '%s', disk %s is skipped: %s", self.vm.name, device, why)
            path = snapshot_disk_file(snaps[0][1], disk.key) if snaps else None
            chain, backing = [], getattr(disk.backing, "parent", None)
            while backing is not None:
                chain.append(backing.fileName)
                backing = getattr(backing, "parent", None)
            disks.append(
                DiskInfo(
                    device=device,
                    node_name=str(disk.key),
                    path=path or getattr(disk.backing, "fileName", "") or "",
                    format="vmdk",
                    virtual_size=_capacity(disk),
                    mode=mode,
                    hotvm_overlays=[tree.name for tree, _ in snaps],
                    backing_chain=chain[len(snaps) :],
                    bus=device.rstrip("0123456789:"),
                    mode_reason=why,
                )
            )
        return disks

    def describe_vm(self) -> dict:
        vm = self._vm()
        cfg = vm.config
        nics = [
            {"label": d.deviceInfo.label if d.deviceInfo else "", "mac": d.macAddress,
             "network": getattr(d.backing, "deviceName", "") or ""}
            for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)
        ]  # fmt: skip
        return {
            "name": vm.name,
            "uuid": cfg.uuid,
            "instance_uuid": cfg.instanceUuid,
            "guest_id": cfg.guestId,
            "guest_full_name": cfg.guestFullName,
            "hardware_version": cfg.version,
            "firmware": cfg.firmware,
            "cpus": cfg.hardware.numCPU,
            "cores_per_socket": cfg.hardware.numCoresPerSocket,
            "memory_bytes": int(cfg.hardware.memoryMB) << 20,
            "vmx": cfg.files.vmPathName,
            "power_state": str(vm.runtime.powerState),
            "host": vm.runtime.host.name if vm.runtime.host else "",
            "change_tracking": bool(cfg.changeTrackingEnabled),
            "disks": [
                {
                    "device": d.device,
                    "path": d.path,
                    "format": d.format,
                    "virtual_size": d.virtual_size,
                    "mode": d.mode.value,
                    "bus": d.bus,
                }
                for d in self.list_disks()
            ],  # fmt: skip
            "nics": nics,
            "snapshots": [tree.name for tree in snapshot_trees(self.conn, vm)],
        }

    def config_files(self) -> list[Path]:
        return []  # nothing local: the .vmx and friends come from the datastore (config_documents)

    def config_documents(self) -> dict[str, bytes]:
        """The .vmx, .nvram and current vmware.log, downloaded from the datastore."""
        vm = self._vm()
        dc = self.conn.datacenter_of(vm)
        vmx = vm.config.files.vmPathName
        vm_dir = vmx.rsplit("/", 1)[0] if "/" in vmx else vmx.split("]")[0] + "]"
        wanted = [vmx]
        for f in vm.layoutEx.file or []:
            if f.type in ("config", "nvram") or (f.type == "log" and f.name.endswith("vmware.log")):
                # vcsim lists these at the datastore root; they live in the VM's directory
                wanted.append(f.name if "/" in f.name else f"{vm_dir}/{parse_ds_path(f.name)[1]}")
        wanted.append(f"{vm_dir}/vmware.log")
        docs = {}
        for ds_path in dict.fromkeys(wanted):
            data = self.conn.read(ds_path, dc)
            if data is None:
                log.warning(
                    "VM '%s': %s is listed but not on the datastore; not backed up", self.vm.name, ds_path
                )
                continue
            docs[parse_ds_path(ds_path)[1].rsplit("/", 1)[-1]] = data
        return docs

    # ------------------------------------------------------------------ REDO cycle

    def add_redo(
        self, devices: list[str], tag: str, track_changes: bool = False, quiesce: bool = False
    ) -> list[FrozenDisk]:
        vm = self._vm()
        self._ask(vm)
        snaps = hotvm_snapshots(self.conn, vm)
        by_name = {device: disk for disk, device in self._disks(vm)}
        devices = list(dict.fromkeys(devices))
        for device in devices:
            disk = by_name.get(device)
            if disk is None:
                raise HypervisorError(
                    f"VM '{self.vm.name}' has no disk {device} (it has {', '.join(by_name) or 'none'})",
                    "rerun: the disk list is read again",
                )
            mode, why = disk_mode(disk)
            if mode is not DiskMode.PERSISTENT:
                raise DiskNotSupported(
                    f"VM '{self.vm.name}', disk {device} cannot take a snapshot: {why}",
                    f"leave it out of the backup (add '{device}' to exclude_disks) or make it persistent",
                )
        if len(snaps) >= 2:
            snapshot = snaps[-1][1]  # the VM-wide second snapshot already covers these disks
            log.info("VM '%s': %s already has its second hotvm snapshot", self.vm.name, devices)
        else:
            n = len(snaps) + 1
            name = f"{OVERLAY_MARKER}{tag}-{n}"
            description = "hotvm hot backup; removed by hotvm. " + freeze_devices.render(devices)
            t0 = time.perf_counter()
            snapshot = self._run(
                vm,
                vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=quiesce),
                f"VM '{self.vm.name}': snapshot {name}",
            )
            log.info("VM '%s': snapshot %s (quiesce=%s) took %.2fs", self.vm.name, name, quiesce,
                     time.perf_counter() - t0)  # fmt: skip
        frozen = []
        for device in devices:
            disk = by_name[device]
            image = snapshot_disk_file(snapshot, disk.key) or disk.backing.fileName
            bitmap = None
            if track_changes and not snaps:
                change_id = getattr(_snapshot_disk(snapshot, disk.key).backing, "changeId", None) or ""
                bitmap = bitmap_name(tag) + (CHANGE_ID_SEP + change_id if change_id else "")
            frozen.append(
                FrozenDisk(
                    device, image, "vmdk", _snapshot_name(self.conn, vm, snapshot), _capacity(disk),
                    str(disk.key), bitmap, "application" if quiesce else "crash",
                )
            )  # fmt: skip
        return frozen

    @contextlib.contextmanager
    def open_frozen_image(self, frozen: FrozenDisk) -> Iterator[FrozenDisk]:
        """Download the frozen disk into a private temp dir (deleted after) for qemu-img to read.

        Real vCenter would stream it with NFC (ExportVm / VDDK) instead; see docs/vsphere.md."""
        vm = self._vm()
        self._ask(vm)
        names = [tree.name for tree, _ in hotvm_snapshots(self.conn, vm)]
        if frozen.overlay not in names:
            raise HypervisorError(
                f"VM '{self.vm.name}', disk {frozen.device}: snapshot {frozen.overlay} that froze it is gone",
                "rerun the backup: the disk would otherwise be read while the guest writes to it",
            )
        dc = self.conn.datacenter_of(vm)
        tmp = Path(tempfile.mkdtemp(prefix="hotvm-vsphere-"))  # mode 0700
        try:
            local = tmp / parse_ds_path(frozen.image)[1].rsplit("/", 1)[-1]
            t0 = time.perf_counter()
            size = self.conn.download(frozen.image, dc, local)
            fmt, extents = local_disk_format(local)
            if fmt == "raw" and size < frozen.virtual_size:
                os.truncate(local, frozen.virtual_size)  # a short flat file: the rest of the disk reads zeros
            base_dir = frozen.image.rsplit("/", 1)[0]
            for extent in extents:  # a descriptor: fetch its flat extents beside it
                size += self.conn.download(f"{base_dir}/{extent}", dc, tmp / extent)
            log.info("VM '%s', disk %s: downloaded %s (%d bytes, %s) in %.2fs", self.vm.name, frozen.device,
                     frozen.image, size, fmt, time.perf_counter() - t0)  # fmt: skip
            yield replace(frozen, image=str(local), format=fmt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def dirty_extents(self, device: str, bitmap: str) -> list[tuple[int, int]]:
        """Changed areas since the change id `bitmap` recorded, via CBT (QueryChangedDiskAreas)."""
        vm = self._vm()
        where = f"VM '{self.vm.name}', disk {device}"
        if not getattr(vm.capability, "changeTrackingSupported", False):
            raise BitmapUnusable(
                f"{where}: the host does not support changed block tracking "
                "(capability.changeTrackingSupported is false; vcsim never does)",
                "a full read is done instead",
            )
        if not vm.config.changeTrackingEnabled:
            raise BitmapUnusable(
                f"{where}: changed block tracking is off for this VM",
                "enable CBT (ctkEnabled) on the VM for incremental backups",
            )
        _, _, change_id = bitmap.partition(CHANGE_ID_SEP)
        if not change_id:
            raise BitmapUnusable(f"{where}: the previous backup recorded no CBT change id", "a full read")
        snaps = hotvm_snapshots(self.conn, vm)
        disk = next((d for d, name in self._disks(vm) if name == device), None)
        if not snaps or disk is None:
            raise BitmapUnusable(f"{where}: no hotvm snapshot to compare against", "a full read")
        extents: list[tuple[int, int]] = []
        offset, size = 0, _capacity(disk)
        try:
            while offset < size:
                info = vm.QueryChangedDiskAreas(snapshot=snaps[0][1], deviceKey=disk.key,
                                                startOffset=offset, changeId=change_id)  # fmt: skip
                extents += [(a.start, a.length) for a in info.changedArea or []]
                if not info.length:
                    break
                offset = info.startOffset + info.length
        except (vmodl.fault.MethodNotFound, vmodl.fault.NotSupported, vim.fault.FileFault) as exc:
            raise BitmapUnusable(
                f"{where}: QueryChangedDiskAreas failed: {getattr(exc, 'msg', '') or type(exc).__name__}",
                "a full read is done instead",
            ) from None
        return extents

    def remove_bitmaps(self, device: str, names: list[str]) -> list[str]:
        return []  # CBT state is the VM's own (ctk files): there is nothing per backup to delete

    def commit_level1(self, device: str) -> CommitResult:
        """Remove the first snapshot, once the last disk it froze has been exported; until then no-op."""
        vm = self._vm()
        self._ask(vm)
        snaps = hotvm_snapshots(self.conn, vm)
        if len(snaps) != 2:
            raise HypervisorError(
                f"VM '{self.vm.name}', disk {device}: commit level 1 needs two hotvm snapshots, "
                f"found {len(snaps)}",
                "call add_redo twice first (or commit_final for a single snapshot)",
            )
        first, snapshot = snaps[0]
        frozen = freeze_devices.parse(first.description)
        if frozen and frozen[-1] != device:
            log.info("VM '%s', disk %s: snapshot %s kept until disk %s is exported too",
                     self.vm.name, device, first.name, frozen[-1])  # fmt: skip
            return CommitResult(device, 0.0)
        t0 = time.perf_counter()
        self._run(vm, snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                  f"VM '{self.vm.name}': removing snapshot {first.name}")  # fmt: skip
        seconds = time.perf_counter() - t0
        log.info(
            "VM '%s': commit level 1 (removed snapshot %s) took %.2fs", self.vm.name, first.name, seconds
        )
        return CommitResult(device, seconds)

    def commit_final(self, device: str) -> CommitResult:
        """Remove the upper hotvm snapshot (the freeze point stays while other disks still need it)."""
        vm = self._vm()
        self._ask(vm)
        snaps = hotvm_snapshots(self.conn, vm)
        if not snaps:
            raise HypervisorError(f"VM '{self.vm.name}', disk {device} has no hotvm snapshot to commit",
                                  "nothing to do")  # fmt: skip
        tree, snapshot = snaps[-1]
        t0 = time.perf_counter()
        self._run(vm, snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                  f"VM '{self.vm.name}': removing snapshot {tree.name}")  # fmt: skip
        if len(snaps) == 1:
            self._consolidate(vm)
        seconds = time.perf_counter() - t0
        log.info("VM '%s': final commit (removed snapshot %s) took %.2fs", self.vm.name, tree.name, seconds)
        return CommitResult(device, seconds)

    def _consolidate(self, vm: vim.VirtualMachine) -> None:
        if vm.runtime.consolidationNeeded:
            log.warning("VM '%s': vSphere reports leftover delta disks; consolidating", self.vm.name)
            self._run(vm, vm.ConsolidateVMDisks_Task(), f"VM '{self.vm.name}': disk consolidation")

    def reconcile(self) -> list[ReconcileAction]:
        """Remove every hotvm snapshot an earlier run left (newest first); users' snapshots are untouched."""
        vm = self._vm()
        self._ask(vm)
        actions = []
        for tree, snapshot in reversed(hotvm_snapshots(self.conn, vm)):
            log.warning("VM '%s': removing hotvm snapshot %s left by an earlier run", self.vm.name, tree.name)
            self._run(vm, snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                      f"VM '{self.vm.name}': removing leftover snapshot {tree.name}")  # fmt: skip
            actions.append(
                ReconcileAction(
                    "", [tree.name], "removed the hotvm snapshot (its changes merged into the disks)"
                )
            )
        if actions:
            self._consolidate(vm)
        return actions


def _capacity(disk: vim.vm.device.VirtualDisk) -> int:
    return int(disk.capacityInBytes or (disk.capacityInKB or 0) * 1024)


def _snapshot_disk(snapshot: vim.vm.Snapshot, key: int) -> vim.vm.device.VirtualDisk:
    return next(d for d in snapshot.config.hardware.device if d.key == key)


def _snapshot_name(conn: Connection, vm: vim.VirtualMachine, snapshot: vim.vm.Snapshot) -> str:
    for tree in snapshot_trees(conn, vm):
        if tree.snapshot == snapshot:
            return tree.name
    return str(snapshot._moId)

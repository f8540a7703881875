"""libvirt driver: the seed's layered REDO with libvirt's own calls (disk-only external snapshots, block
commits, pivot), so libvirt keeps knowing every file its domain uses.

Like the QEMU driver it is stateless: each call reads the domain XML libvirt reports now. hotvm overlays
are found by OVERLAY_MARKER in the chain, so a rerun after a crash sees exactly what was left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt

from hotvm.config import HostConfig, VMConfig
from hotvm.errors import BlockJobError, DiskNotSupported, HypervisorError
from hotvm.hypervisors import libvirt_bitmaps as lb
from hotvm.hypervisors import libvirt_xml as lx
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
)
from hotvm.hypervisors.libvirt_conn import connect, is_local, lookup, require_running
from hotvm.hypervisors.libvirt_host import LibvirtHost

log = logging.getLogger("hotvm.libvirt")

MAX_LAYERS = 2
POLL_S = 0.02
LOG_DIR = Path("/var/log/libvirt/qemu")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
)


class LibvirtDriver(HypervisorDriver):
    """HypervisorDriver for one libvirt domain, looked up by name on the host's URI."""

    name = "libvirt"
    capabilities = frozenset({Capability.HARDWARE, Capability.CONFIG_DOCUMENTS, Capability.REMOTE_IMAGES})

    def __init__(self, vm: VMConfig, host: HostConfig) -> None:
        self.vm, self.host = vm, host
        self.uri = host.uri or "qemu:///system"
        self._conn: libvirt.virConnect | None = None

    # ------------------------------------------------------------------ connection and state

    def _domain(self) -> libvirt.virDomain:
        if self._conn is None:
            self._conn = connect(self.uri)
        return lookup(self._conn, self.vm.name, self.uri)

    def _running(self) -> libvirt.virDomain:
        dom = self._domain()
        require_running(dom, self.uri)
        return dom

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def _xml(self, dom: libvirt.virDomain) -> str:
        return dom.XMLDesc(0 if dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE)

    def _disks(self, dom: libvirt.virDomain) -> list[lx.XmlDisk]:
        return lx.disks(lx.parse(self._xml(dom)))

    def _disk(self, dom: libvirt.virDomain, device: str) -> lx.XmlDisk:
        found = self._disks(dom)
        for disk in found:
            if disk.target == device:
                return disk
        known = ", ".join(d.target for d in found) or "none"
        raise HypervisorError(
            f"domain '{self.vm.name}' has no disk '{device}' (disks: {known})", "use the target dev name"
        )

    def _where(self, device: str) -> str:
        return f"domain '{self.vm.name}', disk {device}"

    # ------------------------------------------------------------------ reading

    def _disk_info(self, dom: libvirt.virDomain, disk: lx.XmlDisk) -> DiskInfo:
        mode, why = disk.mode()
        image, below = disk.image, disk.user_backing
        if mode is DiskMode.TEMPORARY and below:
            image, below = below[0], below[1:]  # the user's image below libvirt's throw-away overlay
        size = 0
        if disk.layers and disk.layers[0].path and disk.source_type == "file":
            with contextlib.suppress(libvirt.libvirtError):
                size = dom.blockInfo(disk.target)[0]
        return DiskInfo(
            device=disk.target,
            node_name=f"{disk.target}[{disk.layers[0].index}]" if disk.layers else disk.target,
            path=image.path if image else "",
            format=image.format if image else "",
            virtual_size=size,
            mode=mode,
            hotvm_overlays=[layer.path for layer in reversed(disk.hotvm_layers)],
            backing_chain=[layer.path for layer in below],
            bus=disk.bus,
            mode_reason=why,
        )

    def list_disks(self) -> list[DiskInfo]:
        dom = self._domain()
        return [self._disk_info(dom, disk) for disk in self._disks(dom)]

    def describe_vm(self) -> dict:
        dom = self._domain()
        root = lx.parse(self._xml(dom))
        state, _ = dom.state()
        os_type = root.find("./os/type")
        conn = dom.connect()
        version = conn.getVersion()  # QEMU's version as major * 1e6 + minor * 1e3 + micro
        vcpus = int(root.findtext("vcpu", "0"))
        return {
            "name": dom.name(),
            "uuid": dom.UUIDString(),
            "libvirt_uri": self.uri,
            "hypervisor": conn.getType(),
            "qemu_version": f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
            "domain_type": root.get("type", ""),
            "state": _STATES.get(state, str(state)),
            "status": _STATES.get(state, str(state)),
            "vcpus": vcpus,
            "cpus": vcpus,
            "memory_bytes": int(dom.maxMemory()) * 1024,
            "machine": os_type.get("machine", "") if os_type is not None else "",
            "disks": [self._disk_info(dom, d).as_dict() for d in self._disks(dom)],
            "nics": lx.nics(root),
            "block_jobs": self._block_jobs(dom) if dom.isActive() else [],
        }

    def _block_jobs(self, dom: libvirt.virDomain) -> list[dict]:
        jobs = []
        for disk in self._disks(dom):
            info = _job(dom, disk.target) if disk.layers and disk.layers[0].path else {}
            if info:
                kind = _JOB_TYPES.get(info["type"], str(info["type"]))
                jobs.append({"id": disk.target, "type": kind, "status": f"{info['cur']}/{info['end']}"})
        return jobs

    def hardware(self) -> dict:
        """For the inventory: NICs with MACs, CD-ROM/floppy drives, and the bytes each disk's chain
        allocates on this machine (None for a remote URI)."""
        dom = self._domain()
        root = lx.parse(self._xml(dom))
        nics = []
        for elem, nic in zip(root.findall("./devices/interface"), lx.nics(root), strict=True):
            alias = elem.find("alias")
            source = ",".join(f"{k}={v}" for k, v in nic["source"].items())
            netdev = f"{nic['type']}:{source}" if source else nic["type"]
            name = alias.get("name", "") if alias is not None else ""
            nics.append({"id": name, "model": nic["model"], "mac": nic["mac"], "netdev": netdev})
        drives = [d for d in lx.disks(root) if d.device in ("cdrom", "floppy")]
        cdroms = [
            {"device": d.target, "path": d.layers[0].path if d.layers else None,
             "format": d.layers[0].format or None if d.layers else None}
            for d in drives
        ]  # fmt: skip
        allocated: dict[str, int | None] = {}
        for disk in lx.disks(root):
            if disk.device in ("cdrom", "floppy"):
                continue
            paths = [Path(layer.path) for layer in disk.layers if layer.path]
            local = is_local(self.uri) and disk.source_type == "file" and all(p.exists() for p in paths)
            allocated[disk.target] = sum(p.stat().st_blocks * 512 for p in paths) if local and paths else None
        return {"nics": nics, "cdroms": cdroms, "allocated": allocated}

    def config_documents(self) -> dict[str, bytes]:
        """The inactive and live domain XML, as the user defined it (never naming hotvm overlays)."""
        dom = self._domain()
        docs = {"domain.xml": lx.without_hotvm_overlays(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))}
        if dom.isActive():
            docs["domain-live.xml"] = lx.without_hotvm_overlays(dom.XMLDesc(0))
        return {name: xml.encode() for name, xml in docs.items()}

    def config_files(self) -> list[Path]:
        """The nvram (OVMF vars) file and the domain's QEMU log, when this machine can read them."""
        if not is_local(self.uri):
            log.info("domain '%s': %s is remote; nvram and log are not copied", self.vm.name, self.uri)
            return []
        dom = self._domain()
        found = []
        nvram = lx.nvram(lx.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        for path in (Path(nvram) if nvram else None, LOG_DIR / f"{dom.name()}.log"):
            if path is None:
                continue
            if os.access(path, os.R_OK):
                found.append(path)
            else:
                log.warning("domain '%s': %s is not readable; left out of the backup", self.vm.name, path)
        return found

    def open_frozen_image(self, frozen: FrozenDisk) -> contextlib.AbstractContextManager[FrozenDisk]:
        return _local_file(frozen, self.uri)

    # ------------------------------------------------------------------ add_redo

    def _overlay_path(self, disk: lx.XmlDisk, n: int, tag: str) -> Path:
        image = disk.image
        assert image is not None
        where = self.vm.overlay_dir or self.host.overlay_dir or Path(image.path).parent
        return Path(where) / f"{os.path.basename(image.path)}{OVERLAY_MARKER}{tag}-{n}.qcow2"

    def _check_redo_possible(self, disk: lx.XmlDisk) -> None:
        mode, why = disk.mode()
        where = self._where(disk.target)
        if mode is not DiskMode.PERSISTENT:
            raise DiskNotSupported(
                f"{where} cannot take an overlay: {why}",
                f"leave it out of the backup (add '{disk.target}' to exclude_disks) or attach it as a "
                "writable, non-shareable, persistent image file",
            )
        if not os.path.isabs(disk.layers[0].path):
            raise DiskNotSupported(
                f"{where}: relative image path {disk.layers[0].path}", "use absolute paths"
            )
        if len(disk.hotvm_layers) >= MAX_LAYERS:
            raise HypervisorError(
                f"{where} already has {len(disk.hotvm_layers)} hotvm overlays",
                "commit them first (commit_level1 / commit_final) or run reconcile",
            )

    def add_redo(
        self, devices: list[str], tag: str, track_changes: bool = False, quiesce: bool = False
    ) -> list[FrozenDisk]:
        if not tag or _SAFE.search(tag):
            raise HypervisorError(
                f"invalid overlay tag {tag!r}", "use letters, digits, '-', '_' and '.' only"
            )
        devices = list(dict.fromkeys(devices))
        dom = self._running()
        all_disks = self._disks(dom)
        by_target = {d.target: d for d in all_disks}
        plan: list[tuple[lx.XmlDisk, Path]] = []
        for device in devices:
            disk = by_target.get(device) or self._disk(dom, device)
            self._check_redo_possible(disk)
            path = self._overlay_path(disk, len(disk.hotvm_layers) + 1, tag)
            if path.exists():
                raise HypervisorError(
                    f"{self._where(device)}: overlay file {path} already exists and the disk does not use it",
                    "a crashed run left it: make sure no VM uses it, delete it, and rerun",
                )
            plan.append((disk, path))
        targets = [d.target for d in all_disks]
        bitmaps = self._start_tracking(dom, plan, tag, targets) if track_changes else {}
        flags = _SNAPSHOT_FLAGS | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesce else 0)
        xml = _snapshot_xml(f"hotvm-{tag}", {d.target: p for d, p in plan}, targets)
        t0 = time.perf_counter()
        try:
            dom.snapshotCreateXML(xml, flags)
        except libvirt.libvirtError as exc:
            self._undo_redo(dom, plan, bitmaps)
            raise self._snapshot_error(exc, quiesce) from None
        log.info(
            "domain '%s': overlays on %s in one snapshot (%.1f ms%s)",
            self.vm.name, ", ".join(devices), (time.perf_counter() - t0) * 1000,
            ", quiesced" if quiesce else "",
        )  # fmt: skip
        return [
            FrozenDisk(
                device=disk.target,
                image=disk.layers[0].path,
                format=disk.layers[0].format,
                overlay=str(path),
                virtual_size=dom.blockInfo(disk.target)[0],
                node=f"{disk.target}[{disk.layers[0].index}]",
                bitmap=bitmaps.get(disk.target),
                consistency="application" if quiesce else "crash",
            )
            for disk, path in plan
        ]

    def _undo_redo(
        self, dom: libvirt.virDomain, plan: list[tuple[lx.XmlDisk, Path]], bitmaps: dict[str, str]
    ) -> None:
        """ATOMIC: libvirt rolled the snapshot back. Drop what hotvm made, but only once the domain's XML
        shows that no disk uses an overlay (a lost connection may hide a snapshot that went through)."""
        try:
            in_use = {layer.path for disk in self._disks(dom) for layer in disk.layers}
        except (libvirt.libvirtError, HypervisorError):
            log.error(
                "domain '%s': cannot tell whether the overlays were added; reconcile will", self.vm.name
            )
            return
        for _, path in plan:
            if str(path) not in in_use:
                _remove_overlay(path)
        for name in bitmaps.values():
            lb.delete_checkpoint(dom, name)

    def _snapshot_error(self, exc: libvirt.libvirtError, quiesce: bool) -> HypervisorError:
        message = exc.get_error_message()
        agent_codes = (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED)
        if quiesce and (exc.get_error_code() in agent_codes or "agent" in message.lower()):
            return HypervisorError(
                f"domain '{self.vm.name}' cannot be quiesced: {message}; nothing was changed",
                "run qemu-guest-agent in the guest with an org.qemu.guest_agent.0 virtio channel in the "
                "domain XML, or set quiesce: false in the policy",
            )
        return HypervisorError(
            f"domain '{self.vm.name}': could not add overlays ({message}); nothing was changed",
            "check the overlay directory (exists, writable and traversable by libvirt's qemu user, "
            "free space)",
        )

    # ------------------------------------------------------------------ change tracking (libvirt_bitmaps)

    def _start_tracking(
        self, dom: libvirt.virDomain, plan: list[tuple[lx.XmlDisk, Path]], tag: str, targets: list[str]
    ) -> dict[str, str]:
        """A checkpoint per qcow2 disk on its first overlay, taken just before the snapshot: its bitmap
        records the writes since a moment before the freeze point (a few more blocks read, none missed)."""
        started: dict[str, str] = {}
        for disk, _ in plan:
            if disk.hotvm_layers:
                continue
            if disk.layers[0].format != "qcow2":
                where, fmt = self._where(disk.target), disk.layers[0].format
                log.info("%s: %s image, no bitmap: the next backup reads it in full", where, fmt)
                continue
            name = lb.checkpoint_name(tag, disk.target)
            try:
                lb.create_checkpoint(dom, name, disk.target, targets)
            except libvirt.libvirtError as exc:
                log.warning("%s: no checkpoint %s (%s): the next backup reads it in full",
                            self._where(disk.target), name, exc.get_error_message())  # fmt: skip
                continue
            started[disk.target] = name
        return started

    def dirty_extents(self, device: str, bitmap: str) -> list[tuple[int, int]]:
        dom = self._running()
        disk = self._disk(dom, device)
        if not disk.hotvm_layers or disk.image is None:
            raise HypervisorError(
                f"{self._where(device)} is not frozen (no hotvm overlay)",
                "read dirty extents only between add_redo and the commits",
            )
        try:
            dom.checkpointLookupByName(bitmap)
        except libvirt.libvirtError:
            raise BitmapUnusable(f"checkpoint {bitmap} of {self._where(device)} is gone") from None
        if not os.access(disk.image.path, os.R_OK):
            raise BitmapUnusable(f"bitmap {bitmap}: frozen image {disk.image.path} is not readable here")
        return lb.read_extents(disk.image.path, disk.image.format, bitmap)

    def remove_bitmaps(self, device: str, names: list[str]) -> list[str]:
        dom = self._domain()
        return [name for name in names if name.endswith(f".{device}") and lb.delete_checkpoint(dom, name)]

    # ------------------------------------------------------------------ commits

    def commit_level1(self, device: str) -> CommitResult:
        dom = self._running()
        disk = self._disk(dom, device)
        hotvm = disk.hotvm_layers
        if len(hotvm) != 2:
            raise HypervisorError(
                f"{self._where(device)}: commit level 1 needs two hotvm overlays, found {len(hotvm)}",
                "call add_redo twice first (or commit_final for a single overlay)",
            )
        upper, lower = hotvm
        image = disk.image
        assert image is not None
        self._no_foreign_job(dom, device)
        t0 = time.perf_counter()
        try:
            dom.blockCommit(device, f"{device}[{image.index}]", f"{device}[{lower.index}]", 0, 0)
        except libvirt.libvirtError as exc:
            raise self._job_error(device, "commit level 1", exc.get_error_message()) from None
        self._wait_job_gone(dom, device, "commit level 1")
        after = self._disk(dom, device)
        if [layer.path for layer in after.layers[:2]] != [upper.path, image.path]:
            raise self._job_error(
                device, "commit level 1", "chain afterwards: " + " <- ".join(x.path for x in after.layers)
            )
        _remove_overlay(Path(lower.path))
        seconds = time.perf_counter() - t0
        log.info("%s: commit level 1 of %s took %.2fs", self._where(device), lower.path, seconds)
        return CommitResult(device, seconds)

    def commit_final(self, device: str) -> CommitResult:
        dom = self._running()
        disk = self._disk(dom, device)
        if not disk.hotvm_layers:
            raise HypervisorError(f"{self._where(device)} has no hotvm overlay to commit", "nothing to do")
        self._no_foreign_job(dom, device)
        return self._commit_active(dom, disk)

    def _commit_active(self, dom: libvirt.virDomain, disk: lx.XmlDisk) -> CommitResult:
        """Active commit of every hotvm overlay into the image, pivot, then delete the overlay files."""
        device, hotvm, image = disk.target, disk.hotvm_layers, disk.image
        assert image is not None and hotvm
        t0 = time.perf_counter()
        if not _job(dom, device):
            try:
                dom.blockCommit(
                    device, f"{device}[{image.index}]", None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
                )
            except libvirt.libvirtError as exc:
                raise self._job_error(device, "final commit", exc.get_error_message()) from None
        self._wait_ready(dom, device)
        t_pivot = time.perf_counter()
        try:
            dom.blockJobAbort(device, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except libvirt.libvirtError as exc:
            self._cancel(dom, device)
            raise self._job_error(device, "pivot", exc.get_error_message()) from None
        # libvirt returns once QEMU has pivoted and libvirt has updated its XML: an upper bound of the stall
        stall_ms = (time.perf_counter() - t_pivot) * 1000
        after = self._disk(dom, device)
        top = after.layers[0].path if after.layers else "nothing"
        if top != image.path:
            raise HypervisorError(
                f"{self._where(device)}: after the final commit the disk runs on {top}, not {image.path}",
                "inspect with virsh domblklist / dumpxml; run reconcile",
            )
        for layer in hotvm:
            _remove_overlay(Path(layer.path))
        seconds = time.perf_counter() - t0
        log.info("%s: final commit %.2fs, pivot stall <= %.1f ms", self._where(device), seconds, stall_ms)
        return CommitResult(device, seconds, stall_ms)

    def _no_foreign_job(self, dom: libvirt.virDomain, device: str) -> None:
        info = _job(dom, device)
        if info:
            kind = _JOB_TYPES.get(info["type"], "block")
            raise BlockJobError(
                f"{self._where(device)}: a {kind} job is already running on it",
                "wait for it to finish, or run reconcile if hotvm left it",
            )

    def _deadline(self) -> float:
        return time.monotonic() + self.host.job_timeout_s

    def _wait_job_gone(self, dom: libvirt.virDomain, device: str, what: str) -> None:
        deadline = self._deadline()
        polls = 0
        while _job(dom, device):
            if time.monotonic() > deadline:
                self._cancel(dom, device)
                raise self._job_error(device, what, f"not done after {self.host.job_timeout_s:g}s: cancelled")
            polls = _pause(polls)

    def _wait_ready(self, dom: libvirt.virDomain, device: str) -> None:
        deadline = self._deadline()
        polls = 0
        while True:
            if not _job(dom, device):
                raise self._job_error(device, "final commit", "the job ended before it was ready to pivot")
            mirror = lx.parse(dom.XMLDesc(0)).find(f"./devices/disk/target[@dev='{device}']/../mirror")
            if mirror is not None and mirror.get("ready") == "yes":
                return
            if time.monotonic() > deadline:
                self._cancel(dom, device)
                raise self._job_error(
                    device, "final commit", f"not ready after {self.host.job_timeout_s:g}s: cancelled"
                )
            polls = _pause(polls)

    def _cancel(self, dom: libvirt.virDomain, device: str) -> None:
        """Cancel the job: the disk stays on its current chain, which holds every write (nothing lost)."""
        with contextlib.suppress(libvirt.libvirtError):
            dom.blockJobAbort(device, 0)
        deadline = time.monotonic() + 30
        while _job(dom, device) and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def _job_error(self, device: str, what: str, detail: str) -> BlockJobError:
        return BlockJobError(
            f"{self._where(device)}: {what} failed: {detail}",
            "check the storage of the image; the disk keeps running on its hotvm overlay until reconcile "
            "succeeds",
        )

    # ------------------------------------------------------------------ reconcile

    def reconcile(self) -> list[ReconcileAction]:
        dom = self._domain()
        if not dom.isActive():
            left = [d for d in self._disks(dom) if d.hotvm_layers]
            if left:
                raise HypervisorError(
                    f"domain '{self.vm.name}' is shut off on hotvm overlays "
                    + ", ".join(f"{d.target}: {d.layers[0].path}" for d in left),
                    "start the domain and rerun (hotvm commits them back while it runs)",
                )
            return []
        actions = []
        for disk in self._disks(dom):
            if not disk.hotvm_layers:
                actions += self._drop_orphans(dom, disk)
                continue
            files = [layer.path for layer in reversed(disk.hotvm_layers)]
            log.warning(
                "%s: leftover hotvm overlays %s; committing them into %s",
                self._where(disk.target), files, disk.image.path if disk.image else "?",
            )  # fmt: skip
            info = _job(dom, disk.target)
            if info and info["type"] != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
                self._wait_job_gone(dom, disk.target, "earlier run's commit")  # level 1 left running
                disk = self._disk(dom, disk.target)
            self._commit_active(dom, disk)
            actions.append(ReconcileAction(disk.target, files, "committed into the disk image and deleted"))
            actions += self._drop_orphans(dom, self._disk(dom, disk.target))
        return actions

    def _drop_orphans(self, dom: libvirt.virDomain, disk: lx.XmlDisk) -> list[ReconcileAction]:
        """Overlay files named after this disk's image that no domain of the host uses (a crash after a
        commit). Every domain is checked: a shared overlay_dir may hold another VM's overlays."""
        image = disk.image
        if image is None or disk.mode()[0] is not DiskMode.PERSISTENT or not os.path.isabs(image.path):
            return []
        where = Path(self.vm.overlay_dir or self.host.overlay_dir or Path(image.path).parent)
        found = list(where.glob(f"{_glob_escape(os.path.basename(image.path))}{OVERLAY_MARKER}*"))
        if not found:
            return []
        in_use = _paths_in_use(dom.connect())
        actions = []
        for path in found:
            if str(path) not in in_use:
                _remove_overlay(path)
                actions.append(ReconcileAction(disk.target, [str(path)], "removed an overlay no chain uses"))
        return actions


# ---------------------------------------------------------------------- helpers

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}
_JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}


def _paths_in_use(conn: libvirt.virConnect) -> set[str]:
    """Every image file any domain of the host names, live chains and persistent definitions alike."""
    paths = set()
    for other in conn.listAllDomains(0):
        flags = [libvirt.VIR_DOMAIN_XML_INACTIVE] + ([0] if other.isActive() else [])
        for flag in flags:
            for disk in lx.disks(lx.parse(other.XMLDesc(flag))):
                paths.update(layer.path for layer in disk.layers)
    return paths


def _pause(polls: int) -> int:
    """Poll fast first (small commits are done in milliseconds), then every half second at most."""
    time.sleep(min(POLL_S * (1.2**polls), 0.5))
    return polls + 1


def _job(dom: libvirt.virDomain, device: str) -> dict:
    return dom.blockJobInfo(device, 0) or {}


def _snapshot_xml(name: str, overlays: dict[str, Path], all_targets: list[str]) -> str:
    """One disk-only snapshot: an external qcow2 overlay for each listed disk, snapshot='no' for the rest."""
    lines = [f"<domainsnapshot><name>{name}</name><disks>"]
    for target in all_targets:
        if target in overlays:
            lines.append(
                f"<disk name={quoteattr(target)} snapshot='external'><driver type='qcow2'/>"
                f"<source file={quoteattr(str(overlays[target]))}/></disk>"
            )
        else:
            lines.append(f"<disk name={quoteattr(target)} snapshot='no'/>")
    lines.append("</disks></domainsnapshot>")
    return "".join(lines)


def _remove_overlay(path: Path) -> None:
    """Delete an overlay file; refuses anything without the hotvm marker (never the user's images)."""
    if OVERLAY_MARKER not in path.name:
        raise AssertionError(f"refusing to delete {path}: not a hotvm overlay")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def _local_file(frozen: FrozenDisk, uri: str) -> Iterator[FrozenDisk]:
    """The frozen image is read where hotvm runs: fine locally, or remotely over the same shared path."""
    if not os.access(frozen.image, os.R_OK):
        raise HypervisorError(
            f"frozen image {frozen.image} of disk {frozen.device} ({uri}) is not readable on this machine",
            "run hotvm on the libvirt host, or mount the host's image storage at the same path here",
        )
    yield frozen


__all__ = ["LibvirtDriver", "LibvirtHost"]

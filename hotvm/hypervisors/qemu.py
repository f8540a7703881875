"""QEMU driver: the seed's layered REDO (overlay, second overlay, commit level 1, final commit) over QMP.

Every method opens the VM's QMP socket, reads the state QEMU reports now, acts, and closes the socket again:
QMP serves one client at a time and the driver must be safe to rerun after a crash (see base.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from hotvm.child_env import child_env
from hotvm.config import HostConfig, VMConfig
from hotvm.errors import BlockJobError, ConfigError, DiskNotSupported, HypervisorError, HypervisorUnreachable
from hotvm.hypervisors.base import (
    BITMAP_PREFIX,
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
from hotvm.hypervisors.qemu_agent import frozen_filesystems
from hotvm.hypervisors.qemu_chain import Chain, Layer, build_chains
from hotvm.hypervisors.qemu_jobs import JobWatcher
from hotvm.hypervisors.qmp import CONNECT_TIMEOUT_S, Monitor, QmpCommandError
from hotvm.locks import lock_dir, open_lock_dir

log = logging.getLogger("hotvm.qemu")

QEMU_IMG_TIMEOUT_S = 60
NBD_EXPORT_PREFIX = "hotvm-nbd-"
MAX_LAYERS = 2
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_BUS_BY_TYPE = (("virtio-blk", "virtio"), ("scsi", "scsi"), ("ide", "ide"), ("usb", "usb"), ("nvme", "nvme"),
                ("floppy", "floppy"), ("sd-card", "sd"))  # fmt: skip


class QemuDriver(HypervisorDriver):
    """HypervisorDriver for one VM reachable through its QMP unix socket."""

    name = "qemu"
    capabilities = frozenset({Capability.HARDWARE})

    def __init__(self, vm: VMConfig, host: HostConfig, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        if vm.qmp is None:
            raise ConfigError(
                f"VM '{vm.name}' has no 'qmp:' socket configured",
                "add qmp: /path/to/vm.qmp and start QEMU with -qmp unix:/path/to/vm.qmp,server=on,wait=off",
            )
        self.vm, self.host = vm, host
        self._mon = Monitor(vm.qmp, vm.name, connect_timeout=connect_timeout)
        self._depth = 0

    # ------------------------------------------------------------------ connection

    @contextlib.contextmanager
    def _session(self) -> Iterator[Monitor]:
        """Hold the socket for one public call (nested calls share it), then release it."""
        self._depth += 1
        try:
            self._mon.connect()
            yield self._mon
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._mon.close()

    def close(self) -> None:
        self._depth = 0
        self._mon.close()

    # ------------------------------------------------------------------ reading state

    def _chains(self, mon: Monitor) -> list[Chain]:
        return build_chains(
            mon.cmd("query-block", retry=True),
            mon.cmd("query-named-block-nodes", {"flat": True}, retry=True),
            mon.cmd("x-debug-query-block-graph", retry=True),
        )

    def _chain(self, mon: Monitor, device: str) -> Chain:
        chains = self._chains(mon)
        for chain in chains:
            if device in (chain.device, chain.backend, chain.qdev):
                return chain
        known = ", ".join(c.device for c in chains) or "none"
        raise HypervisorError(
            f"VM '{self.vm.name}' has no disk '{device}' (disks: {known})", "check the device name"
        )

    def _bus(self, mon: Monitor, qdev: str) -> str:
        if not qdev:
            return ""
        try:
            qtype = mon.cmd("qom-get", {"path": qdev, "property": "type"})
        except QmpCommandError:
            return ""
        return next((bus for key, bus in _BUS_BY_TYPE if key in qtype), qtype)

    def _disk_info(self, mon: Monitor, chain: Chain) -> DiskInfo:
        mode, why = chain.mode()
        idx = chain.image_index
        if mode is DiskMode.TEMPORARY and idx + 1 < len(chain.layers):
            idx += 1  # report the user's real image below QEMU's throw-away overlay
        image = chain.layers[idx] if idx < len(chain.layers) else None
        return DiskInfo(
            device=chain.device,
            node_name=chain.layers[0].node if chain.layers else "",
            path=image.filename if image else "",
            format=image.format if image else "",
            virtual_size=(chain.layers[0].virtual_size if chain.layers else 0),
            mode=mode,
            hotvm_overlays=[layer.filename for layer in reversed(chain.hotvm_layers)],
            backing_chain=[layer.filename for layer in chain.layers[idx + 1 :]],
            bus=self._bus(mon, chain.qdev),
            mode_reason=why,
        )

    def list_disks(self) -> list[DiskInfo]:
        with self._session() as mon:
            return [self._disk_info(mon, chain) for chain in self._chains(mon)]

    def describe_vm(self) -> dict:
        with self._session() as mon:
            version = mon.cmd("query-version", retry=True)
            q = version.get("qemu", {})
            memory = mon.cmd("query-memory-size-summary", retry=True)
            nodes = mon.cmd("query-named-block-nodes", {"flat": True}, retry=True)
            try:
                pci = [
                    {
                        "bus": bus["bus"],
                        "slot": dev["slot"],
                        "function": dev["function"],
                        "class": dev.get("class_info", {}).get(
                            "desc", dev.get("class_info", {}).get("class")
                        ),
                        "vendor": dev.get("id", {}).get("vendor"),
                        "device": dev.get("id", {}).get("device"),
                        "qdev_id": dev.get("qdev_id", ""),
                    }
                    for bus in mon.cmd("query-pci", retry=True)
                    for dev in bus.get("devices", [])
                ]
            except QmpCommandError:  # machines without PCI
                pci = []
            return {
                "name": self.vm.name,
                "qemu_name": mon.cmd("query-name", retry=True).get("name", ""),
                "qemu_version": f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}",
                "qemu_package": version.get("package", "").strip(),
                "status": mon.cmd("query-status", retry=True).get("status"),
                "cpus": len(mon.cmd("query-cpus-fast", retry=True)),
                "memory_bytes": memory.get("base-memory", 0) + memory.get("plugged-memory", 0),
                "disks": [self._disk_info(mon, c).as_dict() for c in self._chains(mon)],
                "block_nodes": [
                    {
                        "node": n["node-name"],
                        "driver": n["drv"],
                        "file": n.get("file", ""),
                        "read_only": n.get("ro", False),
                        "backing_file": n.get("backing_file", ""),
                        "virtual_size": n.get("image", {}).get("virtual-size", 0),
                    }
                    for n in nodes
                ],
                "pci": pci,
                "block_jobs": mon.cmd("query-block-jobs", retry=True),
            }

    def hardware(self) -> dict:
        """What `describe_vm` leaves out and an inventory needs: NICs with their MACs, CD-ROM drives, and
        the bytes each disk's image chain allocates on the host (QEMU's `actual-size` of every layer)."""
        with self._session() as mon:
            nics, cdroms = [], []
            for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
                try:
                    children = mon.cmd("qom-list", {"path": parent}, retry=True)
                except QmpCommandError:
                    continue
                for child in children:
                    kind = str(child.get("type", ""))
                    if not kind.startswith("child<"):
                        continue
                    qtype, path = kind[6:-1], f"{parent}/{child['name']}"
                    if qtype in ("ide-cd", "scsi-cd", "usb-storage-cd"):
                        cdroms.append({"qdev": path})
                        continue
                    try:
                        mac = mon.cmd("qom-get", {"path": path, "property": "mac"})
                    except QmpCommandError:
                        continue  # not a network card
                    try:
                        netdev = mon.cmd("qom-get", {"path": path, "property": "netdev"}) or ""
                    except QmpCommandError:
                        netdev = ""
                    anon = parent.endswith("-anon")
                    nics.append({"id": "" if anon else child["name"], "model": qtype, "mac": mac,
                                 "netdev": netdev})  # fmt: skip
            for block in mon.cmd("query-block", retry=True):
                qdev = block.get("qdev", "")
                match = next((c for c in cdroms if c["qdev"] in (qdev, f"/machine/peripheral/{qdev}")), None)
                if match is None:
                    if block.get("removable") and block.get("type") == "unknown" and "inserted" not in block:
                        match = {"qdev": qdev}
                        cdroms.append(match)
                    else:
                        continue
                inserted = block.get("inserted") or {}
                match.update(
                    device=block.get("device") or qdev.rsplit("/", 1)[-1],
                    path=inserted.get("file") or None,
                    format=inserted.get("drv") or None,
                )
            for cd in cdroms:
                cd.setdefault("device", cd["qdev"].rsplit("/", 1)[-1])
                cd.setdefault("path", None)
                cd.setdefault("format", None)
            listed = mon.cmd("query-named-block-nodes", {"flat": True}, retry=True)
            nodes = {n["node-name"]: n for n in listed}
            allocated = {}
            for chain in self._chains(mon):
                top = nodes.get(chain.layers[0].node) if chain.layers else None
                allocated[chain.device] = _chain_actual_size(top.get("image")) if top else None
            return {"nics": nics, "cdroms": cdroms, "allocated": allocated}

    def config_files(self) -> list[Path]:
        found = []
        for path in self.vm.config_files:
            if Path(path).exists():
                found.append(Path(path))
            else:
                log.warning(
                    "VM '%s': config file %s does not exist; it is left out of the backup", self.vm.name, path
                )
        return found

    # ------------------------------------------------------------------ add_redo

    def _overlay_path(self, chain: Chain, n: int, tag: str) -> Path:
        image = chain.image
        assert image is not None
        where = self.vm.overlay_dir or self.host.overlay_dir
        if where is None:
            if image.protocol != "file":
                raise DiskNotSupported(
                    f"VM '{self.vm.name}', disk {chain.device}: image {image.filename} is a block device, "
                    "there is no directory beside it for the overlay",
                    "set overlay_dir for this VM or host in hotvm.yaml",
                )
            where = Path(image.filename).parent
        return Path(where) / f"{os.path.basename(image.filename)}{OVERLAY_MARKER}{tag}-{n}.qcow2"

    def _check_redo_possible(self, chain: Chain) -> None:
        mode, why = chain.mode()
        where = f"VM '{self.vm.name}', disk {chain.device}"
        if mode is not DiskMode.PERSISTENT:
            raise DiskNotSupported(
                f"{where} cannot take an overlay: {why}",
                f"leave it out of the backup (add '{chain.device}' to exclude_disks) or attach it writable, "
                "without snapshot=on, from a local image file",
            )
        if not os.path.isabs(chain.layers[0].filename):
            raise DiskNotSupported(
                f"{where}: QEMU opened {chain.layers[0].filename} by a relative path; hotvm cannot tell "
                "where that is",
                "start QEMU with absolute image paths",
            )
        if len(chain.hotvm_layers) >= MAX_LAYERS:
            raise HypervisorError(
                f"{where} already has {len(chain.hotvm_layers)} hotvm overlays",
                "commit them first (commit_level1 / commit_final) or run reconcile",
            )

    def add_redo(
        self, devices: list[str], tag: str, track_changes: bool = False, quiesce: bool = False
    ) -> list[FrozenDisk]:
        if quiesce and self.vm.guest_agent is None:
            raise ConfigError(
                f"VM '{self.vm.name}': its policy asks for quiesce but no guest_agent socket is configured",
                "add guest_agent: /path/to/qga.sock to the VM in hotvm.yaml (and run qemu-ga in the guest), "
                "or set quiesce: false in its policy",
            )
        if not tag or _SAFE.search(tag):
            raise HypervisorError(
                f"invalid overlay tag {tag!r}", "use letters, digits, '-', '_' and '.' only"
            )
        devices = list(dict.fromkeys(devices))
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            raise HypervisorError("qemu-img not found", "install qemu-utils (it creates the overlay files)")
        with self._session() as mon:
            plan: list[tuple[Chain, Layer, Path, str]] = []
            for device in devices:
                chain = self._chain(mon, device)
                self._check_redo_possible(chain)
                n = len(chain.hotvm_layers) + 1
                path = self._overlay_path(chain, n, tag)
                if path.exists():
                    raise HypervisorError(
                        f"VM '{self.vm.name}', disk {device}: overlay file {path} already exists "
                        "and is not in use by the disk",
                        "a crashed run left it: make sure no VM uses it, delete it, and rerun",
                    )
                plan.append((chain, chain.layers[0], path, _node_name(path)))

            # The bitmap starts on the image itself (first overlay only), in the same transaction as the
            # overlay: it then records exactly the writes after this freeze point. Writes the guest makes
            # on the overlays reach the image, and so the bitmap, through the commits (verified on 7.2).
            bitmaps: dict[str, str] = {}
            actions: list[dict] = []
            if track_changes:
                bitmap = f"{BITMAP_PREFIX}{tag}"
                nodes = {n["node-name"]: n for n in mon.cmd("query-named-block-nodes", {"flat": True})}
                for chain, top, _, _ in plan:
                    if chain.hotvm_layers:
                        continue
                    node = nodes.get(top.node, {})
                    if any(b.get("name") == bitmap for b in node.get("dirty-bitmaps", [])):
                        # left by a failed attempt of this same set (same id): its point is not ours
                        mon.cmd("block-dirty-bitmap-remove", {"node": top.node, "name": bitmap})
                    actions.append(
                        {
                            "type": "block-dirty-bitmap-add",
                            "data": {"node": top.node, "name": bitmap, "persistent": _can_persist(node)},
                        }
                    )
                    bitmaps[chain.device] = bitmap

            # quiesce: the guest's file systems are frozen for the overlay creation and the transaction
            # only, and thawed whatever happens (frozen_filesystems); the export runs on a thawed guest.
            freeze = (
                frozen_filesystems(self.vm.guest_agent, self.vm.name)
                if quiesce and self.vm.guest_agent is not None
                else contextlib.nullcontext(0)
            )
            with freeze:
                self._redo_transaction(mon, plan, actions, qemu_img)
            return [
                FrozenDisk(
                    chain.device, top.filename, top.format, str(path), top.virtual_size, top.node,
                    bitmaps.get(chain.device), "application" if quiesce else "crash",
                )
                for chain, top, path, _ in plan
            ]  # fmt: skip

    def _redo_transaction(
        self,
        mon: Monitor,
        plan: list[tuple[Chain, Layer, Path, str]],
        actions: list[dict],
        qemu_img: str,
    ) -> None:
        """Create and attach the overlay files, then snapshot every disk onto them in ONE transaction."""
        created: list[Path] = []
        added: list[str] = []
        try:
            for chain, top, path, node in plan:
                _create_overlay(qemu_img, path, top, self.vm.name, chain.device)
                created.append(path)
                mon.cmd(
                    "blockdev-add",
                    {
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {"driver": "file", "filename": str(path), "node-name": f"{node}-f"},
                        "backing": None,
                    },
                )
                added.append(node)
            t0 = time.perf_counter()
            mon.cmd(
                "transaction",
                {
                    "actions": actions
                    + [
                        {"type": "blockdev-snapshot", "data": {"node": top.node, "overlay": node}}
                        for _, top, _, node in plan
                    ]
                },
            )
            log.info(
                "VM '%s': overlays on %s in one transaction (%.1f ms)",
                self.vm.name, ", ".join(c.device for c, *_ in plan), (time.perf_counter() - t0) * 1000,
            )  # fmt: skip
        except HypervisorUnreachable:
            # the transaction may have gone through: never delete files QEMU could be writing to
            log.error(
                "VM '%s': connection lost while adding overlays; reconcile will sort it out", self.vm.name
            )
            raise
        except HypervisorError as exc:
            self._undo_redo(mon, added, created)
            if isinstance(exc, QmpCommandError):
                raise HypervisorError(
                    f"VM '{self.vm.name}': could not add overlays ({exc.message}); nothing was changed",
                    "check the overlay directory (exists, writable by QEMU, free space)",
                ) from None
            raise

    def _undo_redo(self, mon: Monitor, nodes: list[str], files: list[Path]) -> None:
        for node in nodes:
            with contextlib.suppress(HypervisorError):
                mon.cmd("blockdev-del", {"node-name": node})
        for path in files:
            _remove_overlay(path)

    # ------------------------------------------------------------------ dirty bitmaps

    def _image_bitmaps(self, mon: Monitor, chain: Chain) -> tuple[Layer, list[dict]]:
        image = chain.image
        if image is None:
            raise HypervisorError(f"VM '{self.vm.name}', disk {chain.device} has no image", "")
        nodes = mon.cmd("query-named-block-nodes", {"flat": True}, retry=True)
        node = next((n for n in nodes if n["node-name"] == image.node), {})
        return image, list(node.get("dirty-bitmaps", []))

    def dirty_extents(self, device: str, bitmap: str) -> list[tuple[int, int]]:
        where = f"disk {device}"
        with self._session() as mon:
            chain = self._chain(mon, device)
            if not chain.hotvm_layers:
                raise HypervisorError(
                    f"VM '{self.vm.name}', {where} is not frozen (no hotvm overlay)",
                    "read dirty extents only between add_redo and the commits",
                )
            image, bitmaps = self._image_bitmaps(mon, chain)
            found = next((b for b in bitmaps if b.get("name") == bitmap), None)
            if found is None:
                raise BitmapUnusable(
                    f"bitmap {bitmap} missing on {where} (VM restarted, raw disk, or bitmap removed?)"
                )
            if found.get("inconsistent"):
                raise BitmapUnusable(
                    f"bitmap {bitmap} on {where} is inconsistent (QEMU crashed or was killed?)"
                )
            if not found.get("recording", False):
                raise BitmapUnusable(f"bitmap {bitmap} on {where} is not recording (disabled by someone?)")
            if found.get("busy"):
                raise BitmapUnusable(f"bitmap {bitmap} on {where} is in use by another job or export")
            extents = self._read_bitmap_over_nbd(mon, device, image, bitmap)
            granularity = int(found.get("granularity", 65536))
            dirty = sum(length for _, length in extents)
            if abs(dirty - int(found.get("count", 0))) >= granularity:
                raise BitmapUnusable(
                    f"bitmap {bitmap} on {where}: NBD reported {dirty} dirty bytes, QEMU counts "
                    f"{found.get('count')}"
                )
            return extents

    def _nbd_socket(self) -> Path:
        """One private socket per VM, at a stable path so reconcile finds a server a crash left running."""
        assert self.vm.qmp is not None
        name = f".hotvm-nbd-{hashlib.sha1(str(self.vm.qmp).encode()).hexdigest()[:12]}.sock"
        beside = Path(self.vm.qmp).parent / name  # QEMU can create files where it created its QMP socket
        if len(str(beside)) < 100:
            return beside
        os.close(open_lock_dir())  # hotvm's private directory (0700), not a shared /tmp
        return lock_dir() / name

    def _read_bitmap_over_nbd(
        self, mon: Monitor, device: str, image: Layer, bitmap: str
    ) -> list[tuple[int, int]]:
        """Export the frozen image read-only with the bitmap; `qemu-img map` lists its dirty extents."""
        sock = self._nbd_socket()
        export = f"{NBD_EXPORT_PREFIX}{_SAFE.sub('_', device)}"[:60]
        self._stop_nbd(mon)
        try:
            mon.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        except QmpCommandError as exc:
            raise BitmapUnusable(
                f"cannot start QEMU's NBD server to read bitmap {bitmap}: {exc.message}"
            ) from None
        try:
            mon.cmd(
                "block-export-add",
                {"type": "nbd", "id": export, "node-name": image.node, "name": export, "writable": False,
                 "bitmaps": [bitmap]},
            )  # fmt: skip
            opts = (f"driver=nbd,server.type=unix,server.path={sock},export={export},"
                    f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")  # fmt: skip
            try:
                proc = subprocess.run(
                    ["qemu-img", "map", "--output=json", "--image-opts", opts],
                    capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S * 10, env=child_env(),
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise BitmapUnusable(f"qemu-img map of bitmap {bitmap} over NBD timed out") from None
            if proc.returncode != 0:
                raise BitmapUnusable(
                    f"qemu-img map of bitmap {bitmap} over NBD failed: {proc.stderr.strip()}"
                )
            # With x-dirty-bitmap the NBD client reports the bitmap in place of allocation, and the
            # dirty bit is the 'hole' bit: "data": false means DIRTY, "data": true means clean.
            extents = [(int(e["start"]), int(e["length"])) for e in json.loads(proc.stdout) if not e["data"]]
            covered = sum(int(e["length"]) for e in json.loads(proc.stdout))
            if covered != image.virtual_size:
                raise BitmapUnusable(
                    f"bitmap {bitmap}: NBD map covers {covered} bytes of a {image.virtual_size}-byte disk"
                )
            return extents
        finally:
            self._stop_nbd(mon)

    def _stop_nbd(self, mon: Monitor) -> None:
        """Remove hotvm's NBD exports and stop the NBD server hotvm started (found by its socket file)."""
        exports = [e["id"] for e in mon.cmd("query-block-exports", retry=True)]
        mine = [e for e in exports if e.startswith(NBD_EXPORT_PREFIX)]
        for export in mine:
            with contextlib.suppress(QmpCommandError):
                mon.cmd("block-export-del", {"id": export, "mode": "hard"})
        deadline = time.monotonic() + 10
        while mine and time.monotonic() < deadline:
            left = {e["id"] for e in mon.cmd("query-block-exports", retry=True)}
            if not left & set(mine):
                break
            time.sleep(0.02)
        sock = self._nbd_socket()
        if sock.exists():
            try:
                mon.cmd("nbd-server-stop")
            except QmpCommandError as exc:
                log.debug("nbd-server-stop: %s", exc)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    def remove_bitmaps(self, device: str, names: list[str]) -> list[str]:
        removed = []
        with self._session() as mon:
            image, bitmaps = self._image_bitmaps(mon, self._chain(mon, device))
            present = {b.get("name") for b in bitmaps}
            for name in names:
                if not name.startswith(BITMAP_PREFIX) or name not in present:
                    continue
                try:
                    mon.cmd("block-dirty-bitmap-remove", {"node": image.node, "name": name})
                    removed.append(name)
                except QmpCommandError as exc:
                    log.warning(
                        "VM '%s', disk %s: bitmap %s not removed: %s", self.vm.name, device, name, exc
                    )
        return removed

    # ------------------------------------------------------------------ commits

    def _job_id(self, kind: str, device: str) -> str:
        return f"hotvm-{kind}-{_SAFE.sub('_', device)}"[:60]

    def _watcher(self, mon: Monitor, device: str, job_id: str) -> JobWatcher:
        return JobWatcher(mon, self.vm.name, device, job_id, self.host.job_timeout_s, self.host.on_io_error)

    def _start_commit(self, mon: Monitor, chain: Chain, job_id: str, args: dict) -> JobWatcher:
        watcher = self._watcher(mon, chain.device, job_id)
        stale = watcher.job()
        if stale is not None:
            if stale["status"] not in ("concluded", "null"):
                raise BlockJobError(
                    f"VM '{self.vm.name}', disk {chain.device}: job {job_id} is still active "
                    f"({stale['status']})",
                    "wait for it or run reconcile",
                )
            watcher.dismiss()
        base = {"job-id": job_id, "device": chain.root_node, "auto-dismiss": False, "on-error": "stop"}
        mon.cmd("block-commit", base | args)
        return watcher

    def _finish(self, watcher: JobWatcher, outcome_error: str | None, device: str) -> None:
        watcher.dismiss()
        if outcome_error:
            raise BlockJobError(
                f"VM '{self.vm.name}', disk {device}: commit job {watcher.job_id} failed: {outcome_error}",
                "check the storage of the image; the disk stays on its hotvm overlay until reconcile "
                "succeeds",
            )

    def commit_level1(self, device: str) -> CommitResult:
        with self._session() as mon:
            chain = self._chain(mon, device)
            hotvm = chain.hotvm_layers
            if len(hotvm) != 2:
                raise HypervisorError(
                    f"VM '{self.vm.name}', disk {device}: commit level 1 needs two hotvm overlays, "
                    f"found {len(hotvm)}",
                    "call add_redo twice first (or commit_final for a single overlay)",
                )
            upper, lower = hotvm
            image = chain.image
            assert image is not None
            t0 = time.perf_counter()
            watcher = self._start_commit(
                mon, chain, self._job_id("c1", device), {"top-node": lower.node, "base-node": image.node}
            )
            outcome = watcher.wait(until=set())
            self._finish(watcher, outcome.error, device)
            after = self._chain(mon, device)
            if [layer.node for layer in after.layers[:2]] != [upper.node, image.node]:
                raise HypervisorError(
                    f"VM '{self.vm.name}', disk {device}: unexpected chain after commit level 1: "
                    + " <- ".join(layer.filename for layer in after.layers),
                    "run reconcile",
                )
            self._drop_nodes(mon, [lower.node])
            _remove_overlay(Path(lower.filename))
            seconds = time.perf_counter() - t0
            log.info(
                "VM '%s', disk %s: commit level 1 of %s took %.2fs",
                self.vm.name,
                device,
                lower.filename,
                seconds,
            )
            return CommitResult(device, seconds)

    def commit_final(self, device: str) -> CommitResult:
        with self._session() as mon:
            chain = self._chain(mon, device)
            if not chain.hotvm_layers:
                raise HypervisorError(
                    f"VM '{self.vm.name}', disk {device} has no hotvm overlay to commit", "nothing to do"
                )
            return self._commit_active(mon, chain)

    def _commit_active(self, mon: Monitor, chain: Chain) -> CommitResult:
        """Active commit of every hotvm overlay into the image, pivot, then drop the overlays."""
        device, hotvm, image = chain.device, chain.hotvm_layers, chain.image
        assert image is not None and hotvm
        if len(hotvm) > 1:
            log.info(
                "VM '%s', disk %s: committing %d hotvm overlays at once", self.vm.name, device, len(hotvm)
            )
        t0 = time.perf_counter()
        watcher = self._start_commit(mon, chain, self._job_id("cf", device), {"base-node": image.node})
        outcome = watcher.wait(until={"ready"})
        if outcome.status != "ready":
            self._finish(watcher, outcome.error or f"ended as '{outcome.status}' before READY", device)
        t_complete, t_complete_wall = time.perf_counter(), time.time()
        mon.cmd("block-job-complete", {"device": watcher.job_id})
        outcome = watcher.wait(until=set(), interval=0.001)
        # QEMU stamps BLOCK_JOB_COMPLETED when the pivot is done: measure to it, not to our next poll.
        completed_at = mon.event_time("BLOCK_JOB_COMPLETED", device=watcher.job_id)
        if completed_at is not None and completed_at >= t_complete_wall:
            stall_ms = (completed_at - t_complete_wall) * 1000
        else:
            stall_ms = (outcome.finished_at - t_complete) * 1000
        self._finish(watcher, outcome.error, device)
        after = self._chain(mon, device)
        top = after.layers[0] if after.layers else None
        if top is None or top.node != image.node or top.filename != image.filename:
            raise HypervisorError(
                f"VM '{self.vm.name}', disk {device}: after the final commit the disk runs on "
                f"{top.filename if top else 'nothing'}, expected {image.filename}",
                "inspect with query-block; run reconcile",
            )
        self._drop_nodes(mon, [layer.node for layer in hotvm])
        for layer in hotvm:
            _remove_overlay(Path(layer.filename))
        seconds = time.perf_counter() - t0
        log.info(
            "VM '%s', disk %s: final commit %.2fs, pivot stall %.1f ms",
            self.vm.name,
            device,
            seconds,
            stall_ms,
        )
        return CommitResult(device, seconds, stall_ms)

    def _drop_nodes(self, mon: Monitor, nodes: list[str]) -> None:
        """blockdev-del nodes we added (the monitor keeps them alive after they leave the chain)."""
        listed = {n["node-name"] for n in mon.cmd("query-named-block-nodes", {"flat": True}, retry=True)}
        for node in nodes:
            if node in listed:
                try:
                    mon.cmd("blockdev-del", {"node-name": node})
                except QmpCommandError as exc:
                    log.warning("VM '%s': could not blockdev-del %s: %s", self.vm.name, node, exc)

    # ------------------------------------------------------------------ reconcile

    def reconcile(self) -> list[ReconcileAction]:
        actions: list[ReconcileAction] = []
        with self._session() as mon:
            self._stop_nbd(mon)
            self._adopt_jobs(mon)
            chains = self._chains(mon)
            for chain in chains:
                if not chain.hotvm_layers:
                    continue
                files = [layer.filename for layer in reversed(chain.hotvm_layers)]
                log.warning(
                    "VM '%s', disk %s: leftover hotvm overlays %s; committing them into %s",
                    self.vm.name, chain.device, files, chain.image.filename if chain.image else "?",
                )  # fmt: skip
                self._commit_active(mon, chain)
                actions.append(
                    ReconcileAction(chain.device, files, "committed into the disk image and deleted")
                )
            actions += self._drop_orphans(mon, self._chains(mon))
        return actions

    def _adopt_jobs(self, mon: Monitor) -> None:
        """Finish hotvm jobs a crashed run left behind, so the chains we read next are final."""
        for job in mon.cmd("query-jobs", retry=True):
            job_id = job["id"]
            if not job_id.startswith("hotvm-"):
                continue
            watcher = self._watcher(mon, job_id, job_id)
            status = job["status"]
            if status not in ("concluded", "null", "ready"):
                log.warning("VM '%s': waiting for job %s left by an earlier run", self.vm.name, job_id)
                status = watcher.wait(until={"ready"}).status
            if status == "ready":
                log.warning("VM '%s': completing job %s left ready by an earlier run", self.vm.name, job_id)
                mon.cmd("block-job-complete", {"device": job_id})
                watcher.wait(until=set())
            watcher.dismiss()

    def _drop_orphans(self, mon: Monitor, chains: list[Chain]) -> list[ReconcileAction]:
        """Overlay nodes hotvm added that never joined a chain (crash between blockdev-add and snapshot)."""
        in_chains = {layer.node for chain in chains for layer in chain.layers}
        actions = []
        for node in mon.cmd("query-named-block-nodes", {"flat": True}, retry=True):
            name, filename = node["node-name"], node.get("file", "")
            if not name.startswith("hotvm") or name.endswith("-f") or name in in_chains:
                continue
            if OVERLAY_MARKER not in os.path.basename(filename):
                continue
            try:
                mon.cmd("blockdev-del", {"node-name": name})
            except QmpCommandError as exc:
                log.warning("VM '%s': unused overlay node %s not removed: %s", self.vm.name, name, exc)
                continue
            _remove_overlay(Path(filename))
            actions.append(ReconcileAction("", [filename], "removed an overlay that was never attached"))
        return actions


# ---------------------------------------------------------------------- helpers


def _node_name(path: Path) -> str:
    """A node name QEMU accepts (letter first, <= 31 chars) that is stable for one overlay file."""
    return "hotvm-" + hashlib.sha1(str(path).encode()).hexdigest()[:16]


def _can_persist(node: dict) -> bool:
    """Persistent bitmaps need qcow2 v3 (compat 1.1): they are stored in the image on a clean shutdown."""
    if node.get("drv") != "qcow2":
        return False
    compat = node.get("image", {}).get("format-specific", {}).get("data", {}).get("compat", "1.1")
    return compat != "0.10"


def _create_overlay(qemu_img: str, path: Path, backing: Layer, vm: str, device: str) -> None:
    try:
        _create_private_file(path, like=backing.filename)
    except OSError as exc:
        raise HypervisorError(
            f"VM '{vm}', disk {device}: cannot create overlay {path}: {exc.strerror}",
            "check that the overlay directory exists and is writable (or set overlay_dir)",
        ) from None
    # -u: do not open the backing file (QEMU holds its write lock); the size is given explicitly.
    cmd = [qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", backing.filename, "-F", backing.format,
           str(path), str(backing.virtual_size)]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S, env=child_env()
        )
    except subprocess.TimeoutExpired:
        _remove_overlay(path)
        raise HypervisorError(
            f"VM '{vm}', disk {device}: qemu-img create {path} hung for {QEMU_IMG_TIMEOUT_S}s",
            "check the overlay directory's storage",
        ) from None
    if proc.returncode != 0:
        _remove_overlay(path)
        raise HypervisorError(
            f"VM '{vm}', disk {device}: cannot create overlay {path}: {proc.stderr.strip()}",
            "check that the overlay directory exists, is writable and has free space (or set overlay_dir)",
        )


def _create_private_file(path: Path, like: str) -> None:
    """Create `path` with the owner and permissions of the image `like` (0600 when it cannot be read),
    never the umask's: an overlay holds the guest's writes, as readable as the disk itself and no more.
    qemu-img then writes into the existing file and keeps its mode. Never through a symlink."""
    try:
        st = os.stat(like)
        mode, owner = st.st_mode & 0o666, (st.st_uid, st.st_gid)
    except OSError:
        mode, owner = 0o600, None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):  # not root: the file stays ours, as QEMU's is
                os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _remove_overlay(path: Path) -> None:
    """Delete an overlay file; refuses anything without the hotvm marker (never the user's images)."""
    if OVERLAY_MARKER not in path.name:
        raise AssertionError(f"refusing to delete {path}: not a hotvm overlay")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _chain_actual_size(image: dict | None) -> int | None:
    """Sum of `actual-size` over an ImageInfo and its nested backing images (None if QEMU gives none)."""
    total, seen = 0, False
    while image:
        if "actual-size" in image:
            total, seen = total + int(image["actual-size"]), True
        image = image.get("backing-image")
    return total if seen else None

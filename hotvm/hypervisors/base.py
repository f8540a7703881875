"""The one small interface every hypervisor driver implements.

Drivers are stateless between calls on purpose: every method reads what the hypervisor reports now, so a
task that is retried, or a run that follows a killed one, acts on the real state rather than on memory.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hotvm.errors import HotvmError

# Every overlay hotvm creates has this marker in its file name; nothing else is ever committed or deleted.
OVERLAY_MARKER = ".hotvm-redo-"
# Every dirty bitmap hotvm creates is named BITMAP_PREFIX + backup id; it is only ever removed by name.
BITMAP_PREFIX = "hotvm-"


def bitmap_name(backup_id: str) -> str:
    return f"{BITMAP_PREFIX}{backup_id}"


class BitmapUnusable(HotvmError):
    """The change-tracking bitmap cannot be trusted (missing, inconsistent, ...): the export reads it all."""


class DiskMode(enum.StrEnum):
    """The seed's 'detect the disk mode' (persistent vs undoable/non-persistent), for today's drivers."""

    PERSISTENT = "persistent"  # writable, takes an overlay: backed up
    READ_ONLY = "read-only"  # skipped with a warning
    TEMPORARY = "temporary"  # snapshot=on / non-persistent: writes are thrown away; skipped with a warning
    NO_FILE = "no-writable-file"  # empty drive, non-file protocol: skipped with a warning
    SHARED = "shared"  # attached to several VMs (libvirt <shareable/>): an overlay would split it; skipped
    NO_SNAPSHOT = "no-snapshot"  # the user excluded it from snapshots (libvirt snapshot='no'); skipped


@dataclass(frozen=True)
class DiskInfo:
    device: str
    """Stable name of the disk in this VM (qdev id or drive id), used in manifests and restores."""
    node_name: str
    """Node the guest writes to now (top of the chain)."""
    path: str
    """Image file of the disk as hotvm must preserve it: the top of the chain below hotvm's overlays."""
    format: str
    virtual_size: int
    mode: DiskMode
    hotvm_overlays: list[str] = field(default_factory=list)
    """hotvm overlay files currently above `path` (non-empty only mid-backup or after a crash)."""
    backing_chain: list[str] = field(default_factory=list)
    """The user's own backing files below `path` (never touched by hotvm)."""
    bus: str = ""
    mode_reason: str = ""
    """Why a skipped disk has its mode, in the hypervisor's words (e.g. independent_persistent)."""

    @property
    def backed_up(self) -> bool:
        return self.mode is DiskMode.PERSISTENT

    def as_dict(self) -> dict:
        """JSON-ready, for describe_vm() (stored with every backup) and `hotvm status`."""
        return {**dataclasses.asdict(self), "mode": str(self.mode)}


@dataclass(frozen=True)
class FrozenDisk:
    """A disk after add_redo: the guest writes to `overlay`, `image` is frozen and safe to read."""

    device: str
    image: str
    format: str
    overlay: str
    virtual_size: int
    node: str = ""
    """QEMU node of the frozen image (where the dirty bitmaps live)."""
    bitmap: str | None = None
    """Dirty bitmap created at this freeze point (add_redo with track_changes), else None."""
    consistency: Literal["crash", "application"] = "crash"
    """application: the guest's file systems were frozen (quiesced) at this freeze point."""


@dataclass(frozen=True)
class CommitResult:
    device: str
    seconds: float
    stall_ms: float | None = None
    """Only for the final (active) commit: how long the pivot held guest I/O."""


@dataclass(frozen=True)
class ReconcileAction:
    device: str
    overlays: list[str]
    action: str


class Capability(enum.StrEnum):
    """Optional things a driver can do (restic's backend Properties): callers check `capabilities`, never
    probe for methods. A driver without one still has the method, with the explicit default below."""

    HARDWARE = "hardware"
    """hardware() reports NICs, CD-ROMs and allocated bytes per disk (default: {})."""
    CONFIG_DOCUMENTS = "config-documents"
    """config_documents() returns generated config (libvirt domain XML, a fetched VMX) (default: {})."""
    REMOTE_IMAGES = "remote-images"
    """Frozen images are not local files: open_frozen_image() copies or maps them (default: the file)."""
    REGISTER_VMS = "register-vms"
    """HostDriver.register_vm() defines a VM on the host (default: refused with one clear error)."""
    RUNNING_STATE = "running-state"
    """HostDriver.running() tells whether a registered VM runs (default: refused; callers then assume it
    may run and leave its files alone)."""


class HypervisorDriver(abc.ABC):
    """What the flows need from a hypervisor, in the seed's vocabulary (addredo, commit level 1, commit).
    Abstract methods every driver implements; optional ones have explicit defaults, named in
    `capabilities` when a driver overrides them."""

    name: str
    capabilities: frozenset[Capability] = frozenset()

    @abc.abstractmethod
    def describe_vm(self) -> dict:
        """Devices, disks, memory, CPUs as the hypervisor reports them (stored with every backup)."""

    @abc.abstractmethod
    def list_disks(self) -> list[DiskInfo]: ...

    @abc.abstractmethod
    def config_files(self) -> list[Path]:
        """The files that define the VM (the seed's VMX, nvram, logs)."""

    @abc.abstractmethod
    def reconcile(self) -> list[ReconcileAction]:
        """Commit every hotvm overlay an earlier crash left on the VM back into its disk; report it."""

    @abc.abstractmethod
    def add_redo(
        self, devices: list[str], tag: str, track_changes: bool = False, quiesce: bool = False
    ) -> list[FrozenDisk]:
        """Put a new overlay on each device, all at the same instant (one transaction).

        track_changes: also start a dirty bitmap `bitmap_name(tag)` on each disk's image in that same
        transaction (first overlay only), so it records every write after exactly this point.
        quiesce: freeze the guest file systems around this instant only (guest agent / VMware Tools),
        always thawed again, even on failure; raises when the guest cannot be quiesced."""

    @abc.abstractmethod
    def dirty_extents(self, device: str, bitmap: str) -> list[tuple[int, int]]:
        """(start, length) of every range `bitmap` marks dirty on the disk's frozen image (the disk must be
        on its hotvm overlay). Raises BitmapUnusable, saying why, when the bitmap cannot be trusted."""

    @abc.abstractmethod
    def remove_bitmaps(self, device: str, names: list[str]) -> list[str]:
        """Delete those of `names` the disk's image holds (only hotvm's own); returns what was removed."""

    @abc.abstractmethod
    def commit_level1(self, device: str) -> CommitResult:
        """Commit the lower of two hotvm overlays into the disk while the guest writes to the upper one."""

    @abc.abstractmethod
    def commit_final(self, device: str) -> CommitResult:
        """Active commit of the last hotvm overlay and pivot back onto the original image."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # optional (Capability); the defaults are what a driver without the capability means

    def hardware(self) -> dict:
        """NICs, CD-ROMs, allocated bytes per disk, for the inventory (Capability.HARDWARE)."""
        return {}

    def config_documents(self) -> dict[str, bytes]:
        """Generated config stored under documents/ in the config archive, beside the files of
        config_files() (Capability.CONFIG_DOCUMENTS)."""
        return {}

    def open_frozen_image(self, frozen: FrozenDisk) -> contextlib.AbstractContextManager[FrozenDisk]:
        """The frozen disk as a local file `qemu-img` can read: the disk itself for local drivers, a copy
        or a local view for the others (Capability.REMOTE_IMAGES)."""
        return contextlib.nullcontext(frozen)


# --------------------------------------------------------------------------- host-level operations


@dataclass(frozen=True)
class VMDefinition:
    """Everything needed to register a copy of a backed-up VM on a host (restore --to-host, sync-config)."""

    name: str
    """Name of the VM on the destination host."""
    source_vm: str
    source_driver: str
    documents: dict[str, bytes]
    """The config archive's documents/ (domain XML, .vmx, ...) by name."""
    files: dict[str, bytes]
    """The config archive's files/ (launch scripts, nvram, ...) by their original absolute path."""
    description: dict
    """The VM description stored with the backup (describe_vm())."""
    disks: dict[str, Path]
    """device -> restored image file on this machine; the host driver uses or uploads it."""
    new_identity: bool = True
    """True: a copy beside the original (new UUID and MAC addresses); False: the standby of the same VM."""


@dataclass(frozen=True)
class RegisterResult:
    host: str
    name: str
    action: Literal["created", "updated", "unchanged"]
    started: bool = False
    location: str = ""
    """Where the definition lives (domain name/UUID, datastore path of the .vmx, launch spec path)."""


class HostDriver(abc.ABC):
    """Host-wide operations: the seed's `registered_vm_names` and registering a VM (RegisterVM)."""

    name: str
    capabilities: frozenset[Capability] = frozenset()

    @abc.abstractmethod
    def list_vms(self) -> list[str]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def register_vm(self, definition: VMDefinition, start: bool = False) -> RegisterResult:
        """Define (register) the VM, powered off unless `start`; idempotent: an identical VM already
        registered under that name is left alone ("unchanged"), a different one is updated
        (Capability.REGISTER_VMS)."""
        raise HotvmError(f"{self.name} hosts cannot register VMs", "use a host whose driver can")

    def running(self, name: str) -> bool:
        """Whether the registered VM `name` runs now (Capability.RUNNING_STATE)."""
        raise HotvmError(f"{self.name} hosts cannot tell whether a VM runs", "check it on the host")

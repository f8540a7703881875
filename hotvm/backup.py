"""The seed's backup steps as plain functions (no Prefect): the tasks in tasks/ are thin wrappers of these.

Each function opens what it needs from the configuration and closes it again, so any step can be retried
on its own, in another process, after a crash: state lives in the hypervisor and the target, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hotvm.config import Config, HostConfig, VMConfig
from hotvm.config_file import load_config
from hotvm.errors import BackupSetError
from hotvm.formats.configtar import ARCHIVE_NAME, build_config_archive
from hotvm.formats.export import CHUNK_SIZE, Progress, chunk_digest, export_image
from hotvm.formats.manifest import ConfigArchive, DiskRecord, Manifest, SkippedDisk, StepTiming, utcnow
from hotvm.formats.opener import open_repository
from hotvm.formats.repository import Repository, new_backup_id
from hotvm.hypervisors import open_driver
from hotvm.hypervisors.base import (
    BitmapUnusable,
    CommitResult,
    DiskInfo,
    FrozenDisk,
    HypervisorDriver,
    ReconcileAction,
)
from hotvm.hypervisors.resolve import find_vm
from hotvm.immutability import protect_chunks

log = logging.getLogger("hotvm.backup")


@dataclass(frozen=True)
class Session:
    """One VM of the configuration, and where its backups go."""

    config: Config
    host: HostConfig
    vm: VMConfig

    @contextmanager
    def driver(self) -> Iterator[HypervisorDriver]:
        driver = open_driver(self.host, self.vm)
        try:
            yield driver
        finally:
            driver.close()


def open_session(vm: str, config: Config | str | Path | None = None) -> Session:
    cfg = load_config(config)
    host, vm_cfg = find_vm(cfg, vm)
    return Session(cfg, host, vm_cfg)


@dataclass(frozen=True)
class Baseline:
    """What the latest complete backup of this VM on the target says about one disk."""

    backup_id: str
    bitmap: str | None
    """The bitmap that has tracked the disk's changes since that backup (if it still exists)."""


@dataclass(frozen=True)
class DiskPlan:
    todo: list[DiskInfo]
    done: list[DiskRecord]
    skipped: list[SkippedDisk]
    baselines: dict[str, Baseline] = field(default_factory=dict)
    """Per device: the previous backup on this target an incremental can start from."""


def select_disks(disks: list[DiskInfo], vm: VMConfig) -> tuple[list[DiskInfo], list[SkippedDisk]]:
    """The seed's disk-mode check: back up persistent disks, skip the rest with a reason."""
    todo, skipped = [], []
    for disk in disks:
        if disk.device in vm.exclude_disks:
            skipped.append(SkippedDisk(device=disk.device, path=disk.path, reason="excluded in the config"))
        elif not disk.backed_up:
            skipped.append(
                SkippedDisk(
                    device=disk.device,
                    path=disk.path,
                    reason=f"disk mode is {disk.mode.value}"
                    + (f" ({disk.mode_reason})" if disk.mode_reason else "")
                    + ": it cannot take an overlay",
                )
            )
        else:
            todo.append(disk)
    return todo, skipped


def reconcile(session: Session) -> list[ReconcileAction]:
    """Commit back whatever overlay an earlier run left, before anything else is done."""
    with session.driver() as driver:
        return driver.reconcile()


def plan_disks(session: Session, target: str | None, backup_id: str) -> DiskPlan:
    """Which disks still need exporting in this set (a rerun skips disks the target already holds)."""
    with session.driver() as driver:
        disks = driver.list_disks()
    todo, skipped = select_disks(disks, session.vm)
    done = []
    baselines: dict[str, Baseline] = {}
    with open_repository(session.config, target) as repo:
        repo.ensure()
        repo.mark_started(session.vm.name, backup_id, session.host.name)
        for disk in list(todo):
            record = repo.read_disk_record(session.vm.name, backup_id, disk.device)
            if record is not None:
                done.append(record)
                todo.remove(disk)
        previous = latest_complete(repo, session.vm.name, exclude=backup_id)
        if previous is not None:
            baselines = {d.device: Baseline(previous.backup_id, d.bitmap) for d in previous.disks}
    return DiskPlan(todo, done, skipped, baselines)


def latest_complete(repo: Repository, vm: str, exclude: str | None = None) -> Manifest | None:
    complete = [e for e in repo.list_sets(vm) if e.manifest is not None and e.backup_id != exclude]
    return complete[-1].manifest if complete else None


def add_redo(
    session: Session, devices: list[str], backup_id: str, track_changes: bool = False, quiesce: bool = False
) -> list[FrozenDisk]:
    """track_changes (first overlay only): start the bitmap of this backup at this very freeze point.
    quiesce (first overlay only): freeze the guest file systems around that instant."""
    with session.driver() as driver:
        if quiesce:
            return driver.add_redo(devices, backup_id, track_changes=track_changes, quiesce=True)
        return driver.add_redo(devices, backup_id, track_changes=track_changes)


def export_disk(
    session: Session,
    target: str | None,
    backup_id: str,
    frozen: FrozenDisk,
    progress: Progress | None = None,
    baseline: Baseline | None = None,
) -> DiskRecord:
    """Stream the frozen image into the target and journal the disk as done.

    Incremental when `baseline`'s bitmap is still on the disk and trustworthy: only the chunks it marks
    dirty are read, the rest come from the baseline's chunk list. Otherwise a full read, saying why.
    """
    with open_repository(session.config, target) as repo:
        previous, dirty, why = None, None, "no earlier backup of this disk on the target"
        if baseline is not None:
            previous, dirty, why = _incremental_base(session, repo, frozen, baseline)
        with session.driver() as driver, driver.open_frozen_image(frozen) as local:
            record = export_image(
                repo, device=frozen.device, image=local.image, fmt=local.format, progress=progress,
                previous=previous, dirty=dirty,
            )  # fmt: skip
        if local.image != frozen.image:  # a staged copy: record where the disk really lives
            record = record.model_copy(update={"source_path": frozen.image, "source_format": frozen.format})
        incremental = previous is not None and dirty is not None
        record = record.model_copy(
            update={
                "bitmap": frozen.bitmap,
                "incremental_from": baseline.backup_id if incremental and baseline else None,
                "export_mode": (
                    f"incremental from {baseline.backup_id}" if incremental and baseline else f"full ({why})"
                ),
            }
        )
        repo.write_disk_record(session.vm.name, backup_id, record)
    return record


def _incremental_base(
    session: Session, repo: Repository, frozen: FrozenDisk, baseline: Baseline
) -> tuple[DiskRecord | None, list[tuple[int, int]] | None, str]:
    """(previous record, dirty extents, '') for an incremental, else (None, None, why a full read)."""
    if baseline.bitmap is None:
        return None, None, f"backup {baseline.backup_id} started no dirty bitmap on disk {frozen.device}"
    try:
        previous = repo.load_manifest(session.vm.name, baseline.backup_id).disk(frozen.device)
    except (BackupSetError, KeyError):
        return None, None, f"backup {baseline.backup_id} is gone or has no disk {frozen.device}"
    if previous.virtual_size != frozen.virtual_size:
        return (
            None,
            None,
            (f"disk {frozen.device} changed size ({previous.virtual_size} -> {frozen.virtual_size} bytes)"),
        )
    if previous.chunk_size != CHUNK_SIZE:
        return None, None, f"backup {baseline.backup_id} used another chunk size"
    try:
        with session.driver() as driver:
            dirty = driver.dirty_extents(frozen.device, baseline.bitmap)
    except BitmapUnusable as exc:
        log.warning("VM '%s': %s: full read", session.vm.name, exc.message)
        return None, None, exc.message
    return previous, dirty, ""


def incremental_warning(record: DiskRecord, baseline: Baseline | None) -> str | None:
    """A warning when an earlier backup exists on the target and this disk was still read in full."""
    if baseline is None or record.incremental_from is not None:
        return None
    return f"disk {record.device}: not incremental from {baseline.backup_id}, {record.export_mode}"


def superseded_bitmaps(
    baselines: dict[str, Baseline], records: dict[str, DiskRecord]
) -> dict[str, list[str]]:
    """Once a set is complete: per device, the previous backup's bitmap (this set's own tracks from now on).

    Only the bitmap of the previous backup on the SAME target is removed: another target's chain keeps its
    own bitmap."""
    return {
        device: [b.bitmap]
        for device, b in baselines.items()
        if b.bitmap and device in records and records[device].bitmap != b.bitmap
    }


def drop_bitmaps(session: Session, names: dict[str, list[str]]) -> list[str]:
    """Remove hotvm bitmaps by name, per device; returns 'device: name' for each one removed."""
    removed = []
    with session.driver() as driver:
        for device, wanted in names.items():
            if wanted:
                removed += [f"{device}: {n}" for n in driver.remove_bitmaps(device, wanted)]
    return removed


def commit(session: Session, device: str, level: int | str) -> CommitResult:
    """level=1: commit the first overlay under the second (no freeze); 'final': active commit and pivot."""
    with session.driver() as driver:
        return driver.commit_level1(device) if level == 1 else driver.commit_final(device)


def backup_config(session: Session, target: str | None, backup_id: str) -> ConfigArchive:
    with session.driver() as driver:
        files, description, documents = driver.config_files(), driver.describe_vm(), driver.config_documents()
    data, names = build_config_archive(files, description, documents)
    with open_repository(session.config, target) as repo:
        repo.write_blob(session.vm.name, backup_id, ARCHIVE_NAME, data)
    return ConfigArchive(name=ARCHIVE_NAME, sha256=chunk_digest(data), size=len(data), files=names)


def transfer(session: Session, target: str | None, manifest: Manifest) -> str:
    """Last step: check every referenced chunk is on the target, then commit the manifest atomically."""
    with open_repository(session.config, target) as repo:
        damaged = [disk for disk in manifest.disks if not all(repo.has_chunk(d) for d in disk.digests())]
        if damaged:
            for disk in damaged:  # un-journal them, so the rerun exports these disks again
                repo.target.delete(repo.disk_record_path(manifest.vm, manifest.backup_id, disk.device))
            raise BackupSetError(
                f"chunks of disk(s) {', '.join(d.device for d in damaged)} of {manifest.vm}/"
                f"{manifest.backup_id} are missing on the target",
                "rerun the backup: those disks are exported again",
            )
        # Object Lock targets: chunks reused from older sets stay locked at least as long as this set.
        protect_chunks(repo.target, (repo.chunk_path(d) for disk in manifest.disks for d in disk.digests()))
        return repo.commit_manifest(manifest)


__all__ = [
    "Baseline",
    "DiskPlan",
    "Session",
    "StepTiming",
    "add_redo",
    "backup_config",
    "commit",
    "drop_bitmaps",
    "export_disk",
    "incremental_warning",
    "new_backup_id",
    "open_session",
    "plan_disks",
    "reconcile",
    "select_disks",
    "superseded_bitmaps",
    "transfer",
    "utcnow",
]

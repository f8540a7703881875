"""The seed's backup steps as plain functions (no Prefect): the tasks in tasks/ are thin wrappers of these.

Each function opens what it needs from the configuration and closes it again, so any step can be retried
on its own, in another process, after a crash: state lives in the hypervisor and the target, not here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hotvm.errors import BackupSetError
from hotvm.formats.configtar import ARCHIVE_NAME, build_config_archive
from hotvm.formats.export import Progress, chunk_digest, export_image
from hotvm.formats.repository import Repository, new_backup_id
from hotvm.hypervisors import open_driver
from hotvm.hypervisors.base import CommitResult, DiskInfo, FrozenDisk, HypervisorDriver, ReconcileAction
from hotvm.models import (
    Config,
    ConfigArchive,
    DiskRecord,
    HostConfig,
    Manifest,
    SkippedDisk,
    StepTiming,
    VMConfig,
    load_config,
    utcnow,
)
from targets import open_target


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

    @contextmanager
    def repository(self, target: str | None) -> Iterator[Repository]:
        tgt = open_target(self.config.find_target(target))
        try:
            yield Repository(tgt)
        finally:
            tgt.close()


def open_session(vm: str, config: Config | str | Path | None = None) -> Session:
    cfg = config if isinstance(config, Config) else load_config(config)
    host, vm_cfg = cfg.find_vm(vm)
    return Session(cfg, host, vm_cfg)


@dataclass(frozen=True)
class DiskPlan:
    todo: list[DiskInfo]
    done: list[DiskRecord]
    skipped: list[SkippedDisk]


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
                    reason=f"disk mode is {disk.mode.value}: it cannot take an overlay",
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
    with session.repository(target) as repo:
        repo.ensure()
        repo.mark_started(session.vm.name, backup_id, session.host.name)
        for disk in list(todo):
            record = repo.read_disk_record(session.vm.name, backup_id, disk.device)
            if record is not None:
                done.append(record)
                todo.remove(disk)
    return DiskPlan(todo, done, skipped)


def add_redo(session: Session, devices: list[str], backup_id: str) -> list[FrozenDisk]:
    with session.driver() as driver:
        return driver.add_redo(devices, backup_id)


def export_disk(
    session: Session, target: str | None, backup_id: str, frozen: FrozenDisk, progress: Progress | None = None
) -> DiskRecord:
    """Stream the frozen image into the target and journal the disk as done."""
    with session.repository(target) as repo:
        record = export_image(
            repo, device=frozen.device, image=frozen.image, fmt=frozen.format, progress=progress
        )
        repo.write_disk_record(session.vm.name, backup_id, record)
    return record


def commit(session: Session, device: str, level: int | str) -> CommitResult:
    """level=1: commit the first overlay under the second (no freeze); 'final': active commit and pivot."""
    with session.driver() as driver:
        return driver.commit_level1(device) if level == 1 else driver.commit_final(device)


def backup_config(session: Session, target: str | None, backup_id: str) -> ConfigArchive:
    with session.driver() as driver:
        files, description = driver.config_files(), driver.describe_vm()
    data, names = build_config_archive(files, description)
    with session.repository(target) as repo:
        repo.write_blob(session.vm.name, backup_id, ARCHIVE_NAME, data)
    return ConfigArchive(name=ARCHIVE_NAME, sha256=chunk_digest(data), size=len(data), files=names)


def transfer(session: Session, target: str | None, manifest: Manifest) -> str:
    """Last step: check every referenced chunk is on the target, then commit the manifest atomically."""
    with session.repository(target) as repo:
        damaged = [disk for disk in manifest.disks if not all(repo.has_chunk(d) for _, d in disk.chunks)]
        if damaged:
            for disk in damaged:  # un-journal them, so the rerun exports these disks again
                repo.target.delete(repo.disk_record_path(manifest.vm, manifest.backup_id, disk.device))
            raise BackupSetError(
                f"chunks of disk(s) {', '.join(d.device for d in damaged)} of {manifest.vm}/"
                f"{manifest.backup_id} are missing on the target",
                "rerun the backup: those disks are exported again",
            )
        return repo.commit_manifest(manifest)


__all__ = [
    "DiskPlan",
    "Session",
    "StepTiming",
    "add_redo",
    "backup_config",
    "commit",
    "export_disk",
    "new_backup_id",
    "open_session",
    "plan_disks",
    "reconcile",
    "select_disks",
    "transfer",
    "utcnow",
]

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from hotvm import progress as progress_events
from hotvm import restore
from hotvm.bootcheck import BootCheckResult, boot_check_restored
from hotvm.formats.manifest import Manifest
from hotvm.formats.restore import DiskFormat, RestoredDisk
from tasks._options import STEP


@task(name="find_backup", task_run_name="find_backup", **STEP)
def find_backup(vm: str, target: str | None, backup_id: str | None, config: str | None = None) -> Manifest:
    return restore.find_backup(config, vm, target, backup_id)


@task(name="restore_disk", task_run_name="restore {device}", **STEP)
def restore_disk(
    manifest: Manifest, device: str, dest: str, fmt: DiskFormat, target: str | None, config: str | None = None
) -> RestoredDisk:
    """Write one disk, verifying every chunk; the file appears only when it is whole."""

    def progress(done: int, total: int) -> None:
        progress_events.emit("restore", f"{manifest.vm}/{device}", done, total)

    return restore.restore_one_disk(config, target, manifest, device, Path(dest), fmt, progress)


@task(name="restore_config", task_run_name="restore_config", **STEP)
def restore_config(manifest: Manifest, dest: str, target: str | None, config: str | None = None) -> list[str]:
    return restore.restore_config_files(config, target, manifest, Path(dest))


@task(name="record_restore_test", task_run_name="record_restore_test", **STEP)
def record_restore_test(
    manifest: Manifest, result: dict, target: str | None, config: str | None = None
) -> str:
    return restore.record_restore_test(config, target, manifest, result)


@task(name="boot_check", task_run_name="boot_check", retries=0)
def boot_check(manifest: Manifest, disks: list[RestoredDisk], dest: str) -> BootCheckResult:
    """Boot the restored disks in an isolated QEMU and time how long until the guest is up."""
    result = boot_check_restored(manifest, disks, Path(dest))
    get_run_logger().info(
        "boot check of %s: %s in %.1f s", manifest.vm, "up" if result.ok else "FAILED", result.seconds
    )
    return result

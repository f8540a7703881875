"""Daily file-level backup steps: thin tasks over hotvm.files.backup (reconcile, add_redo and commit are
the image flow's own tasks)."""

from __future__ import annotations

import datetime as dt

from prefect import get_run_logger, task

from hotvm import backup
from hotvm.files import backup as files
from hotvm.files.filesets import DiskJournal, FileSetManifest
from hotvm.formats.manifest import StepTiming
from hotvm.hypervisors.base import FrozenDisk
from tasks._options import STEP


@task(name="plan_files", task_run_name="plan", **STEP)
def plan_files(vm: str, target: str | None, backup_id: str, config: str | None = None) -> files.FilesPlan:
    """Disks to read (a rerun skips finished ones) and the previous file set to be incremental from."""
    plan = files.plan(backup.open_session(vm, config), target, backup_id)
    log = get_run_logger()
    for skipped in plan.skipped:
        log.warning("skipping disk %s (%s): %s", skipped.device, skipped.path, skipped.reason)
    for journal in plan.done:
        log.info("disk %s already backed up in %s: not read again", journal.device, backup_id)
    return plan


@task(name="scan_files", task_run_name="scan_files {frozen.device}", **STEP)
def scan_files(
    vm: str,
    target: str | None,
    backup_id: str,
    frozen: FrozenDisk,
    previous: str | None,
    config: str | None = None,
    baseline_bitmap: str | None = None,
) -> DiskJournal:
    """Read every file system of the frozen disk; store new and changed files (journaled per volume).
    A volume the previous set's dirty bitmap shows unchanged is not walked at all."""
    session = backup.open_session(vm, config)
    journal = files.scan_disk(session, target, backup_id, frozen, previous, baseline_bitmap)
    log = get_run_logger()
    for skipped in journal.skipped:
        log.warning("file system %s skipped: %s", skipped.key, skipped.reason)
    return journal


@task(name="finish_files", task_run_name="finish", **STEP)
def finish_files(
    vm: str,
    target: str | None,
    backup_id: str,
    plan: files.FilesPlan,
    journals: list[DiskJournal],
    started: dt.datetime,
    steps: list[StepTiming],
    warnings: list[str],
    config: str | None = None,
) -> FileSetManifest:
    """Every referenced chunk is on the target: write the manifest (last; the set is complete)."""
    return files.finish(
        backup.open_session(vm, config), target, backup_id, plan, journals, started, steps, warnings
    )


@task(name="update_catalog", task_run_name="update_catalog", **STEP)
def update_catalog(vm: str, target: str | None, config: str | None = None) -> dict:
    """Index the new set in the local catalog (derived data: any later use re-syncs it anyway)."""
    return files.update_catalog(backup.open_session(vm, config), target)

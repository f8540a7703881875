"""Restore steps as plain functions: find a set, write its disks and config, record what was restored.

A restore needs only the target: the VM does not have to be in the configuration any more (disaster
recovery), only the target it was backed up to.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from hotvm.errors import HotvmError
from hotvm.formats.repository import Repository
from hotvm.formats.restore import DiskFormat, RestoredDisk, disk_file_name, restore_config, restore_disk
from hotvm.models import Config, Manifest, load_config
from targets import open_target


def _config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def open_repository(config: Config | str | Path | None, target: str | None) -> Repository:
    return Repository(open_target(_config(config).find_target(target)))


def find_backup(
    config: Config | str | Path | None, vm: str, target: str | None, backup_id: str | None = None
) -> Manifest:
    return open_repository(config, target).find(vm, backup_id)


def prepare_destination(dest: Path) -> None:
    """Restores go into a new or empty directory: never over files a user may still need."""
    if dest.exists() and any(dest.iterdir()):
        raise HotvmError(f"restore destination {dest} is not empty", "choose a new directory with --to")
    dest.mkdir(parents=True, exist_ok=True)


def restore_one_disk(
    config: Config | str | Path | None,
    target: str | None,
    manifest: Manifest,
    device: str,
    dest: Path,
    fmt: DiskFormat,
    progress=None,
) -> RestoredDisk:  # noqa: ANN001
    repo = open_repository(config, target)
    return restore_disk(
        repo, manifest.disk(device), dest / disk_file_name(device, fmt), fmt, progress=progress
    )


def record_restore_test(
    config: Config | str | Path | None, target: str | None, manifest: Manifest, result: dict
) -> str:
    """Keep each measured restore beside its backup set: the evidence an RTO is checked against.

    `verified` (default: the boot check passed, or no boot check) false marks the set unverified;
    `problems` says why (the damaged chunk, disk or file)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    check = result.get("boot_check") or {}
    record = {"tested_at": stamp, "verified": check.get("ok", True), "problems": [], **result}
    body = json.dumps(record, indent=2, default=str).encode()
    return open_repository(config, target).write_blob(
        manifest.vm, manifest.backup_id, f"restore-tests/{stamp}.json", body
    )


def restore_config_files(
    config: Config | str | Path | None, target: str | None, manifest: Manifest, dest: Path
) -> list[str]:
    return restore_config(open_repository(config, target), manifest, dest)

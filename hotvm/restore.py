"""Restore steps as plain functions: find a set, write its disks and config, record what was restored.

A restore needs only the target: the VM does not have to be in the configuration any more (disaster
recovery), only the target it was backed up to.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path

from hotvm.config import Config
from hotvm.errors import HotvmError
from hotvm.formats.manifest import Manifest
from hotvm.formats.opener import open_repository
from hotvm.formats.restore import DiskFormat, RestoredDisk, disk_file_name, restore_config, restore_disk


def find_backup(
    config: Config | str | Path | None, vm: str, target: str | None, backup_id: str | None = None
) -> Manifest:
    with open_repository(config, target) as repo:
        return repo.find(vm, backup_id)


def prepare_destination(dest: Path) -> None:
    """Restores go into a new or empty directory: never over files a user may still need."""
    if dest.exists() and any(dest.iterdir()):
        raise HotvmError(f"restore destination {dest} is not empty", "choose a new directory with --to")
    dest.mkdir(parents=True, exist_ok=True)


RESTORED_MARKER = "restore.done.json"


def mark_restored(dest: Path, backup_id: str, disks: list[RestoredDisk], config_files: list[str]) -> None:
    """Written once every disk and config file is in `dest` (a host's vm_dir/NAME/disks-<backup>): a rerun of
    restore --to-host registers them again instead of rewriting disks the registered copy may run on."""
    body = {"backup_id": backup_id, "disks": [asdict(d) for d in disks], "config_files": config_files}
    (dest / RESTORED_MARKER).write_text(json.dumps(body, indent=2))


def completed_restore(dest: Path, backup_id: str, fmt: str) -> tuple[list[RestoredDisk], list[str]] | None:
    """The disks and config files of a finished earlier restore of the same set and format into `dest`."""
    marker = dest / RESTORED_MARKER
    if not marker.exists():
        return None
    body = json.loads(marker.read_text())
    disks = [RestoredDisk(**d) for d in body["disks"]]
    if body["backup_id"] != backup_id or any(d.format != fmt or not Path(d.path).exists() for d in disks):
        return None
    return disks, body["config_files"]


def restore_one_disk(
    config: Config | str | Path | None,
    target: str | None,
    manifest: Manifest,
    device: str,
    dest: Path,
    fmt: DiskFormat,
    progress=None,
) -> RestoredDisk:  # noqa: ANN001
    with open_repository(config, target) as repo:
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
    with open_repository(config, target) as repo:
        return repo.write_blob(manifest.vm, manifest.backup_id, f"restore-tests/{stamp}.json", body)


def restore_config_files(
    config: Config | str | Path | None, target: str | None, manifest: Manifest, dest: Path
) -> list[str]:
    with open_repository(config, target) as repo:
        return restore_config(repo, manifest, dest)


def check_disk_format(fmt: str) -> None:
    """Restored disks are written as qcow2 or raw: anything else is refused before a repository is opened."""
    if fmt not in ("qcow2", "raw"):
        raise HotvmError(f"unknown disk format '{fmt}'", "use qcow2 or raw")

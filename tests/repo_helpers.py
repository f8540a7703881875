"""Small helpers for tests that drive the repository format directly (no VM): commit a set, restore a disk."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hotvm.formats.manifest import DiskRecord, Manifest
from hotvm.formats.repository import Repository
from hotvm.formats.restore import restore_disk


def commit(repo: Repository, vm: str, n: int, record: DiskRecord) -> Manifest:
    """Set n of `vm` holding `record`, committed and read back as a reader sees it (ids sort by n)."""
    when = dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(days=n)
    manifest = Manifest(backup_id=f"{when:%Y%m%dT%H%M%SZ}-{n:04d}", vm=vm, host="h", driver="qemu",
                        disks=[record], started_at=when, completed_at=when)  # fmt: skip
    repo.commit_manifest(manifest)
    return repo.load_manifest(vm, manifest.backup_id)


def restored(repo: Repository, record: DiskRecord, dest: Path) -> bytes:
    return Path(restore_disk(repo, record, dest, "raw", workers=2).path).read_bytes()

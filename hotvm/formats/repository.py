"""Layout of a hotvm repository on a target (docs/format.md):

    hotvm-repository.json                 format marker and version
    chunks/<h[:2]>/<h>                    zstd-compressed chunk, named by sha256 of its plain content
    vms/<vm>/<backup_id>/disks/<dev>.json one exported disk (written when its export finished: resume journal)
    vms/<vm>/<backup_id>/config.tar.zst   the VM's config files and description
    vms/<vm>/<backup_id>/manifest.json    written last: a set without it is incomplete and never restored

Chunks are shared by every set in the repository, so a rerun after a failure and next week's backup only
upload what is not there yet.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from dataclasses import dataclass

from pydantic import ValidationError

from hotvm.errors import BackupSetError, TargetError
from hotvm.models import FORMAT_VERSION, DiskRecord, Manifest
from targets.base import Target

MARKER = "hotvm-repository.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """Device and VM names as single path components."""
    cleaned = _SAFE.sub("_", name).lstrip(".")
    return cleaned or "_"


def new_backup_id(now: dt.datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class SetEntry:
    vm: str
    backup_id: str
    manifest: Manifest | None

    @property
    def complete(self) -> bool:
        return self.manifest is not None


class Repository:
    def __init__(self, target: Target) -> None:
        self.target = target

    # ---- repository
    def ensure(self) -> None:
        """Create the repository on first use; refuse a repository written by a newer format."""
        if self.target.exists(MARKER):
            meta = json.loads(self.target.read_bytes(MARKER))
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise TargetError(
                    f"target '{self.target.name}' holds a hotvm repository of format "
                    f"{meta['format_version']}, newer than this hotvm understands ({FORMAT_VERSION})",
                    "upgrade hotvm",
                )
            return
        self.target.check()
        meta = {"format": "hotvm", "format_version": FORMAT_VERSION, "chunk_hash": "sha256"}
        self.target.write_bytes(MARKER, json.dumps(meta, indent=2).encode())

    # ---- chunks
    @staticmethod
    def chunk_path(digest: str) -> str:
        return f"chunks/{digest[:2]}/{digest}"

    def has_chunk(self, digest: str) -> bool:
        return self.target.exists(self.chunk_path(digest))

    def put_chunk(self, digest: str, compressed: bytes) -> None:
        self.target.write_bytes(self.chunk_path(digest), compressed)

    def get_chunk(self, digest: str) -> bytes:
        try:
            return self.target.read_bytes(self.chunk_path(digest))
        except FileNotFoundError:
            raise BackupSetError(
                f"chunk {digest[:16]}… is missing from target '{self.target.name}'",
                "the repository is damaged; restore from another backup or copy",
            ) from None

    # ---- sets
    @staticmethod
    def set_dir(vm: str, backup_id: str) -> str:
        return f"vms/{safe_name(vm)}/{safe_name(backup_id)}"

    def disk_record_path(self, vm: str, backup_id: str, device: str) -> str:
        return f"{self.set_dir(vm, backup_id)}/disks/{safe_name(device)}.json"

    def write_disk_record(self, vm: str, backup_id: str, record: DiskRecord) -> None:
        self.target.write_bytes(
            self.disk_record_path(vm, backup_id, record.device), record.model_dump_json(indent=1).encode()
        )

    def read_disk_record(self, vm: str, backup_id: str, device: str) -> DiskRecord | None:
        path = self.disk_record_path(vm, backup_id, device)
        try:
            return DiskRecord.model_validate_json(self.target.read_bytes(path))
        except FileNotFoundError:
            return None
        except ValidationError:
            return None  # torn or foreign file: export it again

    def write_blob(self, vm: str, backup_id: str, name: str, data: bytes) -> str:
        path = f"{self.set_dir(vm, backup_id)}/{name}"
        self.target.write_bytes(path, data)
        return path

    def read_blob(self, vm: str, backup_id: str, name: str) -> bytes:
        try:
            return self.target.read_bytes(f"{self.set_dir(vm, backup_id)}/{name}")
        except FileNotFoundError:
            raise BackupSetError(
                f"{name} missing from backup {vm}/{backup_id} on '{self.target.name}'",
                "the set is damaged; use another backup",
            ) from None

    def mark_started(self, vm: str, backup_id: str, host: str) -> None:
        """Make an unfinished set visible (list shows it incomplete; the next run resumes it)."""
        path = f"{self.set_dir(vm, backup_id)}/started.json"
        if not self.target.exists(path):
            body = {"vm": vm, "backup_id": backup_id, "host": host, "started_at": dt.datetime.now(dt.UTC)}
            self.target.write_bytes(path, json.dumps(body, default=str).encode())

    def commit_manifest(self, manifest: Manifest) -> str:
        """The last write of a backup: from here on the set is complete and restorable."""
        set_dir = self.set_dir(manifest.vm, manifest.backup_id)
        self.target.write_bytes(f"{set_dir}/manifest.json", manifest.model_dump_json(indent=1).encode())
        return self.target.display(set_dir)

    def load_manifest(self, vm: str, backup_id: str) -> Manifest:
        path = f"{self.set_dir(vm, backup_id)}/manifest.json"
        try:
            return Manifest.model_validate_json(self.target.read_bytes(path))
        except FileNotFoundError:
            raise BackupSetError(
                f"backup {vm}/{backup_id} on target '{self.target.name}' is not complete (no manifest)",
                "run 'hotvm list' to see complete backups; rerun the backup to finish this one",
            ) from None
        except ValidationError as exc:
            raise BackupSetError(
                f"manifest of {vm}/{backup_id} is unreadable: {exc.errors()[0]['msg']}",
                "the set is damaged; use another backup",
            ) from None

    def list_vms(self) -> list[str]:
        return self.target.listdir("vms")

    def list_sets(self, vm: str | None = None) -> list[SetEntry]:
        entries = []
        for vm_dir in [safe_name(vm)] if vm else self.list_vms():
            for backup_id in self.target.listdir(f"vms/{vm_dir}"):
                try:
                    manifest = self.load_manifest(vm_dir, backup_id)
                except BackupSetError:
                    manifest = None
                entries.append(SetEntry(manifest.vm if manifest else vm_dir, backup_id, manifest))
        return sorted(entries, key=lambda e: (e.vm, e.backup_id))

    def latest(self, vm: str) -> Manifest:
        complete = [e for e in self.list_sets(vm) if e.manifest]
        if not complete:
            raise BackupSetError(
                f"no complete backup of VM '{vm}' on target '{self.target.name}'",
                f"run 'hotvm backup {vm}' first, or pick another --target",
            )
        return complete[-1].manifest  # type: ignore[return-value]

    def find(self, vm: str, backup_id: str | None) -> Manifest:
        return self.load_manifest(vm, backup_id) if backup_id else self.latest(vm)

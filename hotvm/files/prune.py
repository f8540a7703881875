"""File sets in prune: their retention (FilesPolicy.keep, seed Table 7.3: one month) and their chunk
references for the mark phase. hotvm/prune.py's sweep calls these, so `hotvm prune` and the prune flow
never delete a chunk a kept file set still needs.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from hotvm import retention
from hotvm.config import TABLE_7_3_FILES_KEEP, Keep
from hotvm.errors import ChecksumMismatch
from hotvm.files.filesets import ROOT, FileSetManifest, FileSets, VolumeRecord
from hotvm.formats.manifest import utcnow
from hotvm.formats.repository import Repository
from hotvm.retention import BackupPoint, SetState

FILES_KEEP = TABLE_7_3_FILES_KEEP


@dataclass(frozen=True)
class FileSetListing:
    point: BackupPoint
    manifest: FileSetManifest | None
    refs: set[str] | None
    """Chunks the set references (None: cannot be known: an unreadable manifest)."""


def _when(repo: Repository, path: str) -> dt.datetime:
    """The last sign of life of an unfinished set: its newest file."""
    times = [e.modified for e in repo.target.scan(path) if e.modified]
    for sub in ("volumes", "disks"):
        times += [e.modified for e in repo.target.scan(f"{path}/{sub}") if e.modified]
    started = repo.read_started(path).get("started_at")
    if started:
        times.append(retention.aware(dt.datetime.fromisoformat(str(started))))
    from hotvm.prune import id_time  # the same signs of life remove_sets re-reads before deleting

    if (born := id_time(path.rsplit("/", 1)[-1])) is not None:
        times.append(born)
    return max(times) if times else utcnow()


def _journal_refs(fsets: FileSets, vm: str, backup_id: str) -> set[str]:
    refs: set[str] = set()
    for record in fsets.journaled_volumes(vm, backup_id):
        refs.update(record.chunks)
    return refs


def _raw_refs(repo: Repository, path: str) -> set[str] | None:
    try:
        body = json.loads(repo.read_file(f"{path}/manifest.json"))
        return {str(c) for v in body["volumes"] for c in v["chunks"]}
    except (ValueError, KeyError, TypeError, ChecksumMismatch, FileNotFoundError):
        return None


def list_file_sets(repo: Repository) -> list[FileSetListing]:
    fsets = FileSets(repo)
    out = []
    for path in fsets.set_paths():
        vm_dir, backup_id = path.split("/")[1:3]
        try:
            manifest = fsets.parse_manifest(path)
        except FileNotFoundError:
            started = repo.read_started(path)
            vm = str(started.get("vm") or vm_dir)
            point = BackupPoint(vm, backup_id, SetState.INCOMPLETE, _when(repo, path), path=path)
            out.append(FileSetListing(point, None, _journal_refs(fsets, vm_dir, backup_id)))
            continue
        except (ValueError, ChecksumMismatch):
            point = BackupPoint(vm_dir, backup_id, SetState.DAMAGED, _when(repo, path), path=path)
            out.append(FileSetListing(point, None, _raw_refs(repo, path)))
            continue
        point = BackupPoint(manifest.vm, backup_id, SetState.COMPLETE, manifest.completed_at, path=path)
        out.append(FileSetListing(point, manifest, manifest.chunks()))
    return out


def is_file_set(path: str) -> bool:
    return path.startswith(f"{ROOT}/")


__all__ = ["FILES_KEEP", "FileSetListing", "Keep", "VolumeRecord", "is_file_set", "list_file_sets"]

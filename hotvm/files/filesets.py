"""File sets on the target: the daily file-level backups, beside (never among) the image sets.

    files/<vm>/<id>/started.json              an unfinished set is visible (prune keeps it while it may run)
    files/<vm>/<id>/volumes/<key>.entries.zst the volume's entries (a JSON array, zstd; sealed if encrypted)
    files/<vm>/<id>/volumes/<key>.json        the volume's record: written once its entries and chunks are
                                              stored (resume journal: a rerun skips the volume)
    files/<vm>/<id>/disks/<device>.json       every volume of the disk is journaled (a rerun skips the disk)
    files/<vm>/<id>/manifest.json             written last: only then is the set complete

A separate top-level prefix keeps the image code (list, restore, tape copy, verify) from mistaking a file
set for an image set. File contents live in the repository's shared chunk store (`chunks/`), so dedup and
encryption work for them as for disk chunks; each set's manifest lists every chunk it references, which
is what prune marks.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import ClassVar, Literal

import zstandard
from pydantic import Field, ValidationError

from hotvm import __version__
from hotvm.config import StrictModel
from hotvm.errors import BackupSetError, ChecksumMismatch
from hotvm.formats.bounds import ENTRIES_MAX, MANIFEST_MAX
from hotvm.formats.chunkid import ChunkHash
from hotvm.formats.export import decompress_bounded
from hotvm.formats.manifest import (
    BackupId,
    Checksummed,
    DeviceName,
    Sha256Hex,
    SkippedDisk,
    StepTiming,
    VMName,
)
from hotvm.formats.setstore import TMP_MARK, SetEntry, SetStore, target_name

ROOT = "files"
FILESET_FORMAT = 2
"""2: the manifest, volume records and disk journals carry checksums (as image sets, docs/format.md)."""
_ENTRIES_NAME = r"^[^/\x00-\x1f\x7f.][^/\x00-\x1f\x7f]{0,250}$"
"""An entry list's file name: one path component (the volume key may hold ':' or spaces)."""
ENTRIES_LEVEL = 3


class VolumeStats(StrictModel):
    """What one volume's backup did: the per-file-system line of the report."""

    files_seen: int = 0
    dirs_seen: int = 0
    other_seen: int = 0
    """Symlinks, devices, sockets, fifos: metadata only."""
    files_read: int = 0
    """Regular files read from the frozen disk (new or changed since the previous set)."""
    files_stored: int = 0
    """Files whose content was not in the store yet."""
    bytes_seen: int = 0
    bytes_read: int = 0
    bytes_new: int = 0
    """Plain bytes of file content stored for the first time."""
    bytes_unchanged: int = 0
    """Plain bytes of file content already stored (unchanged files, renames, copies)."""
    bytes_stored: int = 0
    """Bytes written to the target for content (compressed, encrypted)."""
    seconds: float = 0.0
    files_unreadable: int = 0
    """Files the damaged file system would not hand out (listed, without content)."""
    unreadable: list[str] = []
    unchanged_volume: bool = False
    """No block of the volume changed since the previous set (dirty bitmap): not walked at all."""


class SkippedVolume(StrictModel):
    key: str
    device: str
    name: str
    reason: str


class VolumeRecord(Checksummed):
    key: str
    device: DeviceName
    name: str
    fstype: str
    label: str | None = None
    start: int = 0
    length: int = 0
    scheme: str = ""
    description: str = ""
    entries: str = Field(pattern=_ENTRIES_NAME)
    """File name (in the set's volumes/) of the entry list."""
    entry_count: int = Field(ge=0)
    chunks: list[Sha256Hex]
    """Every chunk this volume's files reference (prune marks them)."""
    frozen_at: dt.datetime
    stats: VolumeStats


class DiskJournal(Checksummed):
    device: DeviceName
    volumes: list[str]
    skipped: list[SkippedVolume] = []
    bitmap: str | None = None
    """The dirty bitmap started at this disk's freeze: the next set walks only volumes it marks changed."""


class FileSetManifest(Checksummed):
    format_version: int = FILESET_FORMAT
    tool_version: str = __version__
    kind: Literal["files"] = "files"
    backup_id: BackupId
    vm: VMName
    host: str
    started_at: dt.datetime
    completed_at: dt.datetime
    chunk_hash: ChunkHash = "sha256"
    incremental_from: str | None = None
    volumes: list[VolumeRecord]
    skipped_volumes: list[SkippedVolume] = []
    skipped_disks: list[SkippedDisk] = []
    disk_bitmaps: dict[str, str] = {}
    """device -> dirty bitmap started at its freeze (see DiskJournal.bitmap)."""
    steps: list[StepTiming] = []
    warnings: list[str] = []

    def chunks(self) -> set[str]:
        return {c for v in self.volumes for c in v.chunks}

    def volume(self, key: str) -> VolumeRecord:
        for v in self.volumes:
            if v.key == key:
                return v
        raise KeyError(key)


FileSetEntry = SetEntry[FileSetManifest]
"""A file set as FileSets.list_sets shows it."""


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options builds one per call


def encode_entries(entries: Iterable[dict]) -> bytes:
    body = _ENCODER.encode(list(entries)).encode()
    return zstandard.ZstdCompressor(level=ENTRIES_LEVEL).compress(body)


MAX_ENTRIES_BYTES = 1 << 34
"""16 GiB of JSON: tens of millions of entries, more than any one file system we back up holds."""



def decode_entries(blob: bytes) -> list[dict]:
    """An entry list (hostile: checked entry by entry when restored); an unreadable one is BackupSetError."""
    try:
        entries = json.loads(decompress_bounded(blob, MAX_ENTRIES_BYTES))
    except (zstandard.ZstdError, ValueError) as exc:
        raise BackupSetError(
            f"an entry list is unreadable ({exc})", "the set is damaged; use another backup"
        ) from None
    if not isinstance(entries, list):
        raise BackupSetError("an entry list is not a list", "the set is damaged; use another backup")
    return entries


class FileSets(SetStore[FileSetManifest]):
    """File sets of one repository: the generic set store (hotvm/formats/setstore.py) under `files/`, plus
    the volume records, disk journals and entry lists a file set is made of."""

    root: ClassVar[str] = ROOT
    manifest_type = FileSetManifest
    manifest_format = FILESET_FORMAT
    noun = "file set"
    list_hint = "hotvm files ls"
    plural = "file backups"
    journal_dirs = ("volumes", "disks")

    # ---- writing (in the order a backup writes; mark_started and commit_manifest: SetStore)
    def write_volume(self, vm: str, backup_id: str, record: VolumeRecord, entries: list[dict]) -> None:
        """Entries first, record second: a record on the target always has its entries."""
        base = f"{self.set_dir(vm, backup_id)}/volumes"
        self.repo.write_file(f"{base}/{record.entries}", encode_entries(entries))
        self.repo.recheck(f"file set {vm}/{backup_id}")
        record = record.with_checksum()
        self.repo.write_file(f"{base}/{target_name(record.key)}.json", record.model_dump_json().encode())

    def reuse_volume(self, vm: str, backup_id: str, record: VolumeRecord, base: FileSetManifest) -> None:
        """Journal a volume with `base`'s entry list as is (re-sealed under this set's path, never parsed)."""
        src = f"{self.set_path(base.vm, base.backup_id)}/volumes/{record.entries}"
        blob = self.repo.read_file(src, f"entries of {record.key} in {base.backup_id}", limit=ENTRIES_MAX)
        base_dir = f"{self.set_dir(vm, backup_id)}/volumes"
        self.repo.write_file(f"{base_dir}/{record.entries}", blob)
        self.repo.recheck(f"file set {vm}/{backup_id}")
        record = record.with_checksum()
        self.repo.write_file(f"{base_dir}/{target_name(record.key)}.json", record.model_dump_json().encode())

    def read_volume(self, vm: str, backup_id: str, key: str) -> VolumeRecord | None:
        path = f"{self.set_dir(vm, backup_id)}/volumes/{target_name(key)}.json"
        try:
            record = VolumeRecord.model_validate_json(self.repo.read_file(path, limit=MANIFEST_MAX))
        except FileNotFoundError:
            return None
        except (ValidationError, ChecksumMismatch):
            return None  # torn or unauthentic: back the volume up again
        return None if record.checksum_problem(legacy=False) else record

    def _journaled(self, base: str) -> list[VolumeRecord]:
        """The trustworthy volume records in `base` (<set>/volumes)."""
        names = [n for n in self.target.listdir(base) if n.endswith(".json") and TMP_MARK not in n]
        records = []
        for name in sorted(names):
            try:
                body = self.repo.read_file(f"{base}/{name}", limit=MANIFEST_MAX)
                record = VolumeRecord.model_validate_json(body)
            except (FileNotFoundError, ValidationError, ChecksumMismatch):
                continue  # torn or unauthentic: the volume is backed up again
            if f"{target_name(record.key)}.json" == name and not record.checksum_problem(legacy=False):
                records.append(record)
        return records

    def journaled_volumes(self, vm: str, backup_id: str) -> list[VolumeRecord]:
        return self._journaled(f"{self.set_dir(vm, backup_id)}/volumes")

    def write_disk(self, vm: str, backup_id: str, journal: DiskJournal) -> None:
        path = f"{self.set_dir(vm, backup_id)}/disks/{target_name(journal.device)}.json"
        self.repo.recheck(f"file set {vm}/{backup_id}")
        self.repo.write_file(path, journal.with_checksum().model_dump_json().encode())

    def read_disk(self, vm: str, backup_id: str, device: str) -> DiskJournal | None:
        path = f"{self.set_dir(vm, backup_id)}/disks/{target_name(device)}.json"
        try:
            journal = DiskJournal.model_validate_json(self.repo.read_file(path, limit=MANIFEST_MAX))
        except FileNotFoundError:
            return None
        except (ValidationError, ChecksumMismatch):
            return None
        return None if journal.device != device or journal.checksum_problem(legacy=False) else journal

    def before_commit(self, manifest: FileSetManifest) -> None:
        """Every chunk the set references is stored before its manifest makes it complete."""
        missing = [c for c in sorted(manifest.chunks()) if not self.repo.has_chunk(c)]
        if missing:
            raise BackupSetError(
                f"{len(missing)} chunk(s) of file set {manifest.vm}/{manifest.backup_id} are missing on "
                f"target '{self.target.name}' (first {missing[0][:16]}…)",
                "rerun the file backup: the volumes are stored again",
            )

    # ---- reading (manifests and listings: SetStore)
    def read_entries(self, manifest: FileSetManifest, record: VolumeRecord) -> list[dict]:
        path = f"{self.set_path(manifest.vm, manifest.backup_id)}/volumes/{record.entries}"
        try:
            what = f"entries of {record.key} in {manifest.backup_id}"
            return decode_entries(self.repo.read_file(path, what, limit=ENTRIES_MAX))
        except FileNotFoundError:
            raise BackupSetError(
                f"entry list of {record.key} missing from file set {manifest.vm}/{manifest.backup_id}",
                "the set is damaged; use another backup",
            ) from None

    # ---- chunk references (prune's mark phase)
    def refs(self, manifest: FileSetManifest) -> set[str]:
        return manifest.chunks()

    def raw_refs(self, body: dict) -> set[str]:
        return {str(c) for v in body["volumes"] for c in v["chunks"]}

    def journal_refs(self, path: str) -> set[str]:
        return {c for record in self._journaled(f"{path}/volumes") for c in record.chunks}

"""The daily file-level backup's steps as plain functions (flows/daily_files.py runs them as tasks).

Same shape as the image backup (hotvm/backup.py): reconcile and the overlays are shared with it; what
differs is the middle step: instead of exporting the frozen image, each guest file system on it is read
and only new or changed files are stored. Every step reopens what it needs, so any step can be retried
alone; state lives in the hypervisor and on the target (volume and disk journals), never here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hotvm.backup import Session, select_disks
from hotvm.errors import HotvmError
from hotvm.files.filesets import (
    DiskJournal,
    FileSetManifest,
    FileSets,
    SkippedVolume,
    VolumeRecord,
    VolumeStats,
)
from hotvm.files.scan import content_index, scan_volume
from hotvm.formats.manifest import SkippedDisk, StepTiming, utcnow
from hotvm.formats.opener import open_repository
from hotvm.hypervisors.base import BitmapUnusable, DiskInfo, FrozenDisk

log = logging.getLogger("hotvm.files")


@dataclass(frozen=True)
class FilesPlan:
    todo: list[DiskInfo]
    done: list[DiskJournal]
    skipped: list[SkippedDisk]
    previous: str | None
    """The previous complete file set of the VM on this target (the incremental base)."""
    bitmaps: dict[str, str] = field(default_factory=dict)
    """device -> the previous set's dirty bitmap: a volume it marks unchanged is not walked again."""


def plan(session: Session, target: str | None, backup_id: str) -> FilesPlan:
    """Disks to read (a rerun skips disks whose every volume is journaled) and the incremental base."""
    with session.driver() as driver:
        disks = driver.list_disks()
    todo, skipped = select_disks(disks, session.vm)
    with open_repository(session.config, target) as repo:
        repo.ensure()
        fsets = FileSets(repo)
        fsets.mark_started(session.vm.name, backup_id, session.host.name)
        done = []
        for disk in list(todo):
            journal = fsets.read_disk(session.vm.name, backup_id, disk.device)
            if journal is not None:
                done.append(journal)
                todo.remove(disk)
        previous = fsets.latest(session.vm.name, exclude=backup_id)
    if previous is None:
        return FilesPlan(todo, done, skipped, None)
    return FilesPlan(todo, done, skipped, previous.backup_id, dict(previous.disk_bitmaps))


def scan_disk(
    session: Session,
    target: str | None,
    backup_id: str,
    frozen: FrozenDisk,
    previous: str | None,
    baseline_bitmap: str | None = None,
) -> DiskJournal:
    """Back up every file system of one frozen disk; volumes already journaled by an earlier attempt are
    skipped, an unreadable one is reported and skipped (the others still back up)."""
    from hotvm.files.blockdev import open_image
    from hotvm.files.volumes import find_volumes

    vm = session.vm.name
    with open_repository(session.config, target) as repo:
        fsets = FileSets(repo)
        base = fsets.load_manifest(vm, previous) if previous else None
        base_entries: dict[str, list[dict]] = {}
        known: dict = {}

        def load_base() -> None:
            """The previous set's entries: only when a volume is walked (an unchanged one needs none)."""
            if base is not None and not base_entries:
                for record in base.volumes:
                    base_entries[record.key] = fsets.read_entries(base, record)
                    known.update(content_index(base_entries[record.key]))

        keys, skipped = [], []
        with (
            session.driver() as driver,
            driver.open_frozen_image(frozen) as local,
            open_image(local.image, local.format) as source,
        ):
            dirty = _dirty_extents(driver, frozen, baseline_bitmap) if base is not None else None
            for volume in find_volumes(source, frozen.device):
                if fsets.read_volume(vm, backup_id, volume.key) is not None:
                    keys.append(volume.key)
                    continue
                if dirty is not None and _reuse_unchanged(fsets, vm, backup_id, base, volume, dirty):
                    keys.append(volume.key)
                    continue
                load_base()
                reason = _backup_volume(fsets, vm, backup_id, source, volume, base_entries, known)
                if reason is None:
                    keys.append(volume.key)
                    continue
                log.warning("%s: volume %s skipped: %s", vm, volume.key, reason)
                skipped.append(
                    SkippedVolume(key=volume.key, device=volume.device, name=volume.name, reason=reason)
                )
        journal = DiskJournal(device=frozen.device, volumes=keys, skipped=skipped, bitmap=frozen.bitmap)
        fsets.write_disk(vm, backup_id, journal)
    return journal


def _dirty_extents(driver, frozen: FrozenDisk, bitmap: str | None) -> list[tuple[int, int]] | None:  # noqa: ANN001
    """What changed on the disk since the previous file set froze it; None when that cannot be trusted
    (no bitmap, VM restarted on a raw disk, driver without bitmaps, ...): then every volume is walked."""
    if bitmap is None or frozen.bitmap is None:
        return None
    try:
        return driver.dirty_extents(frozen.device, bitmap)
    except (BitmapUnusable, NotImplementedError, AttributeError) as exc:
        log.info("disk %s: every volume walked (%s)", frozen.device, getattr(exc, "message", exc))
        return None


def _reuse_unchanged(
    fsets: FileSets,
    vm: str,
    backup_id: str,
    base: FileSetManifest,
    volume,
    dirty: list[tuple[int, int]],  # noqa: ANN001
) -> bool:
    """A volume no dirty extent touches since the previous set: its entries are that set's, unread."""
    end = volume.start + volume.length
    if any(start < end and volume.start < start + length for start, length in dirty):
        return False
    try:
        old = base.volume(volume.key)
    except KeyError:
        return False
    if (old.start, old.length) != (volume.start, volume.length):
        return False
    stats = VolumeStats(
        files_seen=old.stats.files_seen, dirs_seen=old.stats.dirs_seen, other_seen=old.stats.other_seen,
        bytes_seen=old.stats.bytes_seen, bytes_unchanged=old.stats.bytes_seen, unchanged_volume=True,
    )  # fmt: skip
    record = old.model_copy(update={"frozen_at": utcnow(), "stats": stats})
    fsets.reuse_volume(vm, backup_id, record, base)
    log.info("%s %s: no block changed since %s, not walked", vm, volume.key, base.backup_id)
    return True


def _backup_volume(
    fsets: FileSets,
    vm: str,
    backup_id: str,
    source,
    volume,
    base_entries: dict,
    known: dict,  # noqa: ANN001
) -> str | None:
    """Store one volume and journal it; returns why it was skipped (None: backed up)."""
    from hotvm.files.fs import FilesystemUnreadable, open_filesystem

    frozen_at = utcnow()
    try:
        with open_filesystem(source, volume) as fs:
            result = scan_volume(fsets.repo, fs, base_entries.get(volume.key), known)
            fstype, label = fs.fstype, fs.label
    except FilesystemUnreadable as exc:
        return exc.message
    except OSError as exc:  # a corrupt file system failing mid-walk (TSK raises IOError)
        return f"read error: {exc}"
    record = VolumeRecord(
        key=volume.key, device=volume.device, name=volume.name, fstype=fstype, label=label,
        start=volume.start, length=volume.length, scheme=volume.scheme, description=volume.description,
        entries=f"{volume.key}.entries.zst", entry_count=len(result.entries), chunks=result.chunks,
        frozen_at=frozen_at, stats=result.stats,
    )  # fmt: skip
    fsets.write_volume(vm, backup_id, record, result.entries)
    log.info("%s %s (%s): %s", vm, volume.key, fstype, result.stats)
    return None


def finish(
    session: Session,
    target: str | None,
    backup_id: str,
    plan_: FilesPlan,
    journals: list[DiskJournal],
    started,  # noqa: ANN001 - datetime
    steps: list[StepTiming],
    warnings: list[str],
) -> FileSetManifest:
    """Check every referenced chunk is stored, then write the manifest (last, atomic)."""
    vm = session.vm.name
    with open_repository(session.config, target) as repo:
        fsets = FileSets(repo)
        records: list[VolumeRecord] = []
        for journal in journals:
            for key in journal.volumes:
                record = fsets.read_volume(vm, backup_id, key)
                if record is None:
                    raise HotvmError(
                        f"volume {key} of file set {vm}/{backup_id} is journaled, but its record is gone",
                        "rerun the file backup with a new set",
                    )
                records.append(record)
        manifest = FileSetManifest(
            backup_id=backup_id, vm=vm, host=session.host.name, started_at=started, completed_at=utcnow(),
            incremental_from=plan_.previous, volumes=records,
            skipped_volumes=[s for j in journals for s in j.skipped], skipped_disks=plan_.skipped,
            disk_bitmaps={j.device: j.bitmap for j in journals if j.bitmap},
            steps=steps, warnings=warnings,
        )  # fmt: skip
        from hotvm.immutability import protect_chunks  # Object Lock: reused chunks as long as the set

        protect_chunks(repo.target, map(repo.chunk_path, manifest.chunks()))
        return fsets.commit_manifest(manifest)


def update_catalog(session: Session, target: str | None) -> dict:
    from hotvm.files.browse import sync_catalog
    from hotvm.files.catalog import Catalog

    with open_repository(session.config, target) as repo, Catalog.for_repository(repo) as catalog:
        return sync_catalog(catalog, repo, session.vm.name)


def summary_rows(manifest: FileSetManifest) -> list[dict]:
    """Per file system: what the report, the artifact and `hotvm files backup` show."""
    rows = [
        {"volume": v.key, "fstype": v.fstype, "status": "ok", **v.stats.model_dump()}
        for v in manifest.volumes
    ]
    rows += [
        {"volume": s.key, "fstype": "", "status": "skipped", "reason": s.reason}
        for s in manifest.skipped_volumes
    ]
    return rows

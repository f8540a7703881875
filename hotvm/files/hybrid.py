"""Hybrid restore, the seed's recommended recovery: the latest weekly image, brought up to the last daily.

1. restore the latest complete image set as raw disks (the image restore code: every chunk verified);
2. for each file system of the newest file set (if newer than the image), mount the restored partition
   read-write through a loop device (A7's mounted_volume: the kernel's own ext4/ntfs-3g/fat writers, so
   the result is a file system its guest will mount) and make its tree equal to the file set: new and
   changed files written with their metadata, files deleted since the image removed. The restored disk
   holds the guest's own (hostile) tree: every write goes through hotvm.safepath.SafeRoot (no symlink on
   the disk is followed) and entries are checked as in a files restore.
A loop mount rather than libguestfs: libguestfs needs its own appliance kernel and KVM to be usable here,
a loop mount needs neither (docs/files.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from hotvm.config import Config
from hotvm.files.browse import ChunkCache
from hotvm.files.filesets import FileSets
from hotvm.files.restore import Planned, RestoreReport, TreeWriter, plan_entries
from hotvm.formats.opener import open_repository
from hotvm.formats.repository import Repository
from hotvm.formats.restore import disk_file_name, restore_config, restore_disk
from hotvm.restore import prepare_destination
from hotvm.safepath import SafeRoot, UnsafePath, printable

log = logging.getLogger("hotvm.files")
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PROTECTED_AT_ROOT = ("lost+found", "System Volume Information")
"""Kept even when the file set does not list them (file-system housekeeping the reader leaves out)."""


def _same_file(dest: SafeRoot, p: Planned) -> bool:
    try:
        st = dest.lstat(p.rel)
    except UnsafePath:
        return False
    e = p.entry
    return (
        st is not None and stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
    )


def _delete_unlisted(root: Path, wanted: set[str], problems: list[str]) -> int:
    """Remove what the file set does not list, walking with directory fds (no symlink is followed). What
    the kernel will not list or remove (a forged entry on the disk) is reported and left as it is."""
    deleted = 0
    stack = [(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "")]
    try:
        while stack:
            fd, rel_top = stack.pop()
            try:
                deleted += _delete_in(fd, rel_top, wanted, stack)
            except OSError as exc:
                problems.append(f"/{printable(rel_top)}: {exc.strerror} on the restored disk; left as it is")
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return deleted


def _delete_in(fd: int, rel_top: str, wanted: set[str], stack: list[tuple[int, str]]) -> int:
    deleted = 0
    for child in list(os.scandir(fd)):
        name = child.name
        rel = f"{rel_top}/{name}" if rel_top else name
        is_dir = child.is_dir(follow_symlinks=False)
        if rel in wanted:
            if is_dir:
                stack.append((os.open(name, _NOFOLLOW_DIR, dir_fd=fd), rel))
            continue
        if not rel_top and (name in PROTECTED_AT_ROOT or name.startswith("$")):
            continue
        if is_dir:
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
        deleted += 1
    return deleted


def apply_tree(root: Path, entries: list[dict], reader) -> dict:  # noqa: ANN001 - Reader
    """Make the tree under `root` equal to `entries` (volume-relative paths): unsafe entries skipped and
    named, nothing written through a symlink, symlinks created last."""
    report = RestoreReport()
    plan = plan_entries(entries, report)
    stats = {"written": 0, "unchanged": 0, "deleted": 0, "dirs_created": 0}
    stats["deleted"] = _delete_unlisted(root, {p.rel for p in plan}, report.skipped)
    with SafeRoot(root, create=False) as dest:
        writer = TreeWriter(dest, reader, report)
        for p in plan:
            kind = p.entry.kind
            if kind == "dir":
                try:
                    st = dest.lstat(p.rel)
                except UnsafePath as exc:
                    report.skipped.append(exc.message)
                    continue
                stats["dirs_created"] += st is None or not stat.S_ISDIR(st.st_mode)
                writer.put(p)
            elif kind == "file":
                if p.entry.error:  # unreadable when backed up: the image's copy is the best there is
                    report.metadata_errors.append(
                        f"{printable(p.entry.path)}: kept from the image ({p.entry.error})"
                    )
                elif _same_file(dest, p):
                    stats["unchanged"] += 1
                    if p.group:
                        writer.first_of.setdefault(p.group, p.rel)
                elif writer.put(p):
                    stats["written"] += 1
        for p in plan:  # last: no symlink is ever the parent of a write
            if p.entry.kind != "symlink":
                continue
            try:
                same = dest.readlink(p.rel) == (p.entry.target or "")
            except UnsafePath as exc:
                report.skipped.append(exc.message)
                continue
            if same:
                stats["unchanged"] += 1
            elif writer.put(p):
                stats["written"] += 1
        writer.finish()
    stats["metadata_errors"] = report.metadata_errors[:20]
    stats["skipped"] = report.skipped[:50]
    return stats


def hybrid_restore(
    config: Config | str | Path | None,
    vm: str,
    to: Path,
    target: str | None = None,
    backup_id: str | None = None,
) -> dict:
    """The image set (latest, or `backup_id`) as raw disks in `to`, then the newest file set applied."""
    with open_repository(config, target) as repo:
        return _hybrid_restore(repo, vm, Path(to).resolve(), backup_id)


def _hybrid_restore(repo: Repository, vm: str, dest: Path, backup_id: str | None) -> dict:
    from hotvm.files.blockdev import open_image
    from hotvm.files.mount import mounted_volume
    from hotvm.files.volumes import find_volumes

    image = repo.find(vm, backup_id)
    prepare_destination(dest)
    disks = {
        d.device: restore_disk(repo, d, dest / disk_file_name(d.device, "raw"), "raw") for d in image.disks
    }
    config_files = restore_config(repo, image, dest)
    result: dict = {
        "vm": vm, "backup_id": image.backup_id, "to": str(dest), "hybrid": True, "files_backup_id": None,
        "disks": [
            {"device": k, "path": str(d.path), "format": "raw", "bytes": d.virtual_size}
            for k, d in disks.items()
        ],
        "config_files": config_files, "volumes": [], "notes": [],
    }  # fmt: skip
    fsets = FileSets(repo)
    files = fsets.latest(vm)
    if files is None:
        result["notes"].append(
            f"no file-level backup of {vm}: the image {image.backup_id} is the newest state"
        )
        return result
    if files.completed_at <= image.completed_at:
        result["notes"].append(
            f"the newest file set {files.backup_id} is older than image {image.backup_id}: nothing to apply"
        )
        return result
    result["files_backup_id"] = files.backup_id
    cache = ChunkCache(repo)

    def reader(e: dict):  # noqa: ANN202
        for digest, offset, length in e["pieces"] or ():
            yield cache.get(digest)[offset : offset + length]

    for record in files.volumes:
        row = {"volume": record.key, "fstype": record.fstype}
        restored = disks.get(record.device)
        if restored is None:
            row["skipped"] = f"disk {record.device} is not in image {image.backup_id}"
            result["volumes"].append(row)
            continue
        with open_image(restored.path, "raw") as source:
            volume = next((v for v in find_volumes(source, record.device) if v.name == record.name), None)
        if volume is None:
            row["skipped"] = f"no partition {record.name} on the restored disk {record.device}"
            result["volumes"].append(row)
            continue
        entries = fsets.read_entries(files, record)
        with mounted_volume(Path(restored.path), volume, record.fstype) as root:
            row.update(apply_tree(Path(root), entries, reader))
        log.info("hybrid restore of %s %s: %s", vm, record.key, row)
        result["volumes"].append(row)
    return result

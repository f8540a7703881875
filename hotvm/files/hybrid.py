"""Hybrid restore, the seed's recommended recovery: the latest weekly image, brought up to the last daily.

1. restore the latest complete image set as raw disks (the image restore code: every chunk verified);
2. for each file system of the newest file set (if newer than the image), mount the restored partition
   read-write through a loop device (A7's mounted_volume: the kernel's own ext4/ntfs-3g/fat writers, so
   the result is a file system its guest will mount) and make its tree equal to the file set: new and
   changed files written with their metadata, files deleted since the image removed.
A loop mount rather than libguestfs: libguestfs needs its own appliance kernel and KVM to be usable here,
a loop mount needs neither (docs/files.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from hotvm.files.browse import ChunkCache
from hotvm.files.filesets import FileSets
from hotvm.files.restore import RestoreReport, apply_metadata, destination, write_file
from hotvm.models import Config
from hotvm.restore import open_repository, prepare_destination, restore_config_files, restore_one_disk

log = logging.getLogger("hotvm.files")
PROTECTED_AT_ROOT = ("lost+found", "System Volume Information")
"""Kept even when the file set does not list them (file-system housekeeping the reader leaves out)."""


def _same_file(path: Path, e: dict) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == e["size"] and st.st_mtime_ns == e["mtime_ns"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def apply_tree(root: Path, entries: list[dict], reader) -> dict:  # noqa: ANN001 - Reader
    """Make the tree under `root` equal to `entries` (volume-relative paths, parents first)."""
    wanted = {e["path"]: e for e in entries}
    stats = {"written": 0, "unchanged": 0, "deleted": 0, "dirs_created": 0}
    for top, dirs, files in os.walk(root, topdown=True):
        rel_top = "/" + os.path.relpath(top, root).replace(os.sep, "/").removeprefix(".").strip("/")
        for name in list(dirs) + files:
            rel = (rel_top.rstrip("/") + "/" + name) if rel_top != "/" else "/" + name
            if rel in wanted:
                continue
            if rel_top == "/" and (name in PROTECTED_AT_ROOT or name.startswith("$")):
                continue
            _remove(Path(top) / name)
            stats["deleted"] += 1
            if name in dirs:
                dirs.remove(name)
    report = RestoreReport()
    first_of: dict[str, Path] = {}
    dir_entries = []
    for e in entries:
        d = destination(root, e["path"])
        kind = e["kind"]
        if kind == "dir":
            if not d.is_dir() or d.is_symlink():
                _remove(d)
                d.mkdir(parents=True)
                stats["dirs_created"] += 1
            dir_entries.append((d, e))
            continue
        if kind == "symlink":
            if d.is_symlink() and os.readlink(d) == (e["target"] or ""):
                stats["unchanged"] += 1
                continue
            _remove(d)
            try:
                os.symlink(e["target"] or "", d)
            except OSError as exc:
                report.metadata_errors.append(f"{e['path']}: symlink: {exc.strerror}")
                continue
        elif kind == "file":
            group = e.get("link") or (e["path"] if e["nlink"] > 1 else None)
            if e.get("error"):  # unreadable when backed up: the image's copy is the best there is
                report.metadata_errors.append(f"{e['path']}: kept from the image ({e['error']})")
                continue
            if _same_file(d, e):
                stats["unchanged"] += 1
                if group:
                    first_of.setdefault(group, d)
                continue
            _remove(d)
            if group and group in first_of:
                try:
                    os.link(first_of[group], d)
                    stats["written"] += 1
                    continue
                except OSError:
                    pass
            write_file(d, e, reader)
            if group:
                first_of[group] = d
        else:
            continue
        stats["written"] += 1
        apply_metadata(d, e, report)
    for d, e in reversed(dir_entries):
        apply_metadata(d, e, report)
    stats["metadata_errors"] = report.metadata_errors[:20]
    return stats


def hybrid_restore(
    config: Config | str | Path | None,
    vm: str,
    to: Path,
    target: str | None = None,
    backup_id: str | None = None,
) -> dict:
    """The image set (latest, or `backup_id`) as raw disks in `to`, then the newest file set applied."""
    from hotvm.files.blockdev import open_image
    from hotvm.files.mount import mounted_volume
    from hotvm.files.volumes import find_volumes

    repo = open_repository(config, target)
    image = repo.find(vm, backup_id)
    dest = Path(to).resolve()
    prepare_destination(dest)
    disks = {d.device: restore_one_disk(config, target, image, d.device, dest, "raw") for d in image.disks}
    config_files = restore_config_files(config, target, image, dest)
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

"""Write backed-up entries into a directory with their metadata: files, directories, symlinks, hard links.

Nothing in the destination is overwritten unless asked: every conflict is found before the first byte is
written, so a refused restore changes nothing. Ownership is restored when running as root; directory times
are set last (writing a file into a directory changes its mtime).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hotvm.errors import ChecksumMismatch, HotvmError

Reader = Callable[[dict], Iterator[bytes]]


@dataclass
class RestoreReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    other: int = 0
    bytes: int = 0
    metadata_errors: list[str] = field(default_factory=list)
    """Metadata the destination file system cannot hold (a vfat destination has no owners or symlinks)."""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("files", "dirs", "symlinks", "hardlinks", "other", "bytes")} | {
            "metadata_errors": self.metadata_errors[:20]
        }


def destination(root: Path, path: str) -> Path:
    """root + the entry's path, never outside root (a path with '..' from a hostile guest stays inside)."""
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    return root.joinpath(*parts) if parts else root


def conflicts(entries: list[dict], root: Path) -> list[str]:
    """Existing non-directory paths a restore would replace (directories are merged into)."""
    out = []
    for e in entries:
        d = destination(root, e["path"])
        if os.path.lexists(d) and not (e["kind"] == "dir" and d.is_dir() and not d.is_symlink()):
            out.append(str(d))
    return out


def apply_metadata(path: Path, e: dict, report: RestoreReport, times: bool = True) -> None:
    is_link = e["kind"] == "symlink"
    try:
        if os.geteuid() == 0:
            os.chown(path, e["uid"], e["gid"], follow_symlinks=False)
        if not is_link:
            os.chmod(path, stat.S_IMODE(e["mode"]))
        if times:
            os.utime(path, ns=(e["atime_ns"], e["mtime_ns"]), follow_symlinks=False)
    except OSError as exc:
        report.metadata_errors.append(f"{e['path']}: {exc.strerror}")


def write_file(path: Path, e: dict, reader: Reader) -> int:
    """Write to a temporary name, check the size, then rename: a torn restore never looks complete."""
    tmp = path.with_name(f".{path.name}.hotvm-restore")
    written = 0
    with open(tmp, "wb") as f:
        for block in reader(e):
            f.write(block)
            written += len(block)
    if written != e["size"]:
        tmp.unlink()
        raise ChecksumMismatch(
            f"{e['path']}: restored {written} bytes, the backup says {e['size']}", "use another backup"
        )
    os.replace(tmp, path)
    return written


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def restore_entries(
    entries: list[dict], reader: Reader, root: Path, overwrite: bool = False
) -> RestoreReport:
    """Write `entries` (parents first) under `root`, each at root + its path."""
    root.mkdir(parents=True, exist_ok=True)
    if not overwrite and (clash := conflicts(entries, root)):
        raise HotvmError(
            f"{len(clash)} file(s) already exist in {root} (first: {clash[0]})",
            "restore into another directory with --to, or pass --overwrite",
        )
    report = RestoreReport()
    first_of: dict[str, Path] = {}
    dirs: list[tuple[Path, dict]] = []
    for e in entries:
        d = destination(root, e["path"])
        d.parent.mkdir(parents=True, exist_ok=True)
        kind = e["kind"]
        if kind == "dir":
            if os.path.lexists(d) and not d.is_dir():
                _remove(d)
            d.mkdir(exist_ok=True)
            dirs.append((d, e))
            report.dirs += 1
            continue
        if os.path.lexists(d):
            _remove(d)
        if kind == "symlink":
            try:
                os.symlink(e["target"] or "", d)
            except OSError as exc:
                report.metadata_errors.append(f"{e['path']}: symlink: {exc.strerror}")
                continue
            report.symlinks += 1
        elif kind == "file":
            if e.get("error"):  # the damaged guest file system would not hand it out at backup time
                report.metadata_errors.append(f"{e['path']}: not in the backup ({e['error']})")
                continue
            group = e.get("link") or (e["path"] if e["nlink"] > 1 else None)
            if group and group in first_of:
                try:
                    os.link(first_of[group], d)
                    report.hardlinks += 1
                    continue
                except OSError:
                    pass  # another file system, or no hard links there: a copy instead
            report.bytes += write_file(d, e, reader)
            report.files += 1
            if group:
                first_of[group] = d
        else:
            report.other += 1  # devices, fifos, sockets: listed in the catalog, not recreated
            continue
        apply_metadata(d, e, report)
    for d, e in reversed(dirs):  # deepest first: their children are all written now
        apply_metadata(d, e, report)
    return report

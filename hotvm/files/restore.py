"""Write backed-up entries into a directory with their metadata: files, directories, symlinks, hard links.

Entries come from a guest (hostile): each is validated (names, sizes, numbers) before it touches the
destination, and every write goes through hotvm.safepath.SafeRoot, which never follows a symlink on the way
to an entry. Symlinks are created last, so none of them is ever a parent of a later write; an entry below
a symlink or file of the same backup (a name with '/' made in the guest) is skipped with a warning naming it.

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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from hotvm.errors import HotvmError
from hotvm.safepath import MAX_PATH_BYTES, SafeRoot, UnsafePath, parts, printable

Reader = Callable[[dict], Iterator[bytes]]
MAX_FILE_SIZE = 1 << 50
"""1 PiB: larger than any guest file system holds a file; a bigger size is a damaged or forged entry."""
_U32 = 2**32 - 1
_NS = 2**62
ChunkId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Offset = Annotated[int, Field(ge=0, le=MAX_FILE_SIZE)]


def _name_text(value: object) -> str:
    """A name as read (pydantic's str would refuse the surrogateescape'd bytes of a non-UTF-8 name)."""
    if not isinstance(value, str):
        raise ValueError("not a string")  # noqa: TRY004 - pydantic turns ValueError into its error
    if len(value) > MAX_PATH_BYTES:
        raise ValueError(f"longer than {MAX_PATH_BYTES}")
    return value


NameText = Annotated[Any, AfterValidator(_name_text)]


class RestorableEntry(BaseModel):
    """One entry of a file set (or an image set's walk), checked before anything is written for it."""

    model_config = ConfigDict(extra="ignore")

    path: NameText
    kind: Literal["file", "dir", "symlink", "other"]
    size: int = Field(0, ge=0, le=MAX_FILE_SIZE)
    mode: int = Field(0o644, ge=0, le=0o7777)
    uid: int = Field(0, ge=0, le=_U32 - 1)
    gid: int = Field(0, ge=0, le=_U32 - 1)
    mtime_ns: int = Field(0, ge=-_NS, le=_NS)
    atime_ns: int = Field(0, ge=-_NS, le=_NS)
    nlink: int = Field(1, ge=0, le=_U32)
    target: NameText | None = None
    link: NameText | None = None
    pieces: list[tuple[ChunkId, Offset, Offset]] | None = None
    error: NameText | None = None


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
    skipped: list[str] = field(default_factory=list)
    """Entries not restored, each naming the entry and why (unsafe names, invalid entries, blocked paths)."""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("files", "dirs", "symlinks", "hardlinks", "other", "bytes")} | {
            "metadata_errors": self.metadata_errors[:20],
            "skipped": self.skipped[:50],
            "skipped_count": len(self.skipped),
        }


@dataclass
class Planned:
    rel: str
    """The entry's path relative to the destination root, every component checked."""
    entry: RestorableEntry
    raw: dict
    """The entry as read (the reader needs it)."""

    @property
    def group(self) -> str | None:
        """Hard links of one file share a group: its first path."""
        e = self.entry
        return e.link or (e.path if e.nlink > 1 else None)


def _label(raw: object) -> str:
    path = raw.get("path") if isinstance(raw, dict) else None
    return printable(path)[:200] if isinstance(path, str) else repr(raw)[:80]


def _check(e: RestorableEntry) -> str | None:
    """Why a validated entry still cannot be restored (None: it can)."""
    if e.kind == "symlink" and e.target is not None and "\0" in e.target:
        return "symlink target holds NUL"
    pieces = e.pieces if e.kind == "file" and not e.error else None  # None also: read from a disk image
    if pieces is not None and sum(length for _, _, length in pieces) != e.size:
        return f"its content pieces do not add up to its size {e.size}"
    return None


def plan_entries(entries: list[dict], report: RestoreReport) -> list[Planned]:
    """The entries that can be restored, parents first; every other one is in report.skipped, named."""
    planned: list[Planned] = []
    kinds: dict[str, str] = {}
    for raw in entries:
        try:
            e = RestorableEntry.model_validate(raw)
        except ValidationError as exc:
            where = ".".join(str(x) for x in exc.errors()[0]["loc"])
            report.skipped.append(f"{_label(raw)}: invalid entry ({where}: {exc.errors()[0]['msg']})")
            continue
        try:
            names = parts(e.path, "entry path")
        except UnsafePath as exc:
            report.skipped.append(exc.message)
            continue
        problem = "it is the destination itself" if not names else _check(e)
        rel = "/".join(names)
        if problem is None and rel in kinds:
            problem = "a second entry with the same path"
        if problem:
            report.skipped.append(f"{printable(e.path)[:200]}: {problem}; skipped")
            continue
        kinds[rel] = e.kind
        planned.append(Planned(rel, e, raw))
    out = []
    for p in planned:
        names = p.rel.split("/")
        above = ("/".join(names[:i]) for i in range(1, len(names)))
        blocker = next((a for a in above if kinds.get(a, "dir") != "dir"), None)
        if blocker is not None:
            report.skipped.append(
                f"{printable(p.entry.path)[:200]}: its parent /{printable(blocker)} is a {kinds[blocker]} in "
                "the backup (a name holding '/' made in the guest?); skipped"
            )
            continue
        out.append(p)
    out.sort(key=lambda p: p.rel.count("/"))
    return out


def _existing(plan: list[Planned], dest: SafeRoot) -> dict[str, os.stat_result | None]:
    """What is at each entry's path now (None: something in the way of reaching it: a symlink or a file
    where a parent directory should be). Entries whose path is free are left out."""
    out: dict[str, os.stat_result | None] = {}
    for p in plan:
        try:
            st = dest.lstat(p.rel)
        except UnsafePath:
            out[p.rel] = None
            continue
        if st is not None:
            out[p.rel] = st
    return out


def _in_the_way(p: Planned, st: os.stat_result | None) -> bool:
    return st is None or not (p.entry.kind == "dir" and stat.S_ISDIR(st.st_mode))


def apply_metadata(dest: SafeRoot, p: Planned, report: RestoreReport, times: bool = True) -> None:
    e = p.entry
    try:
        dest.set_metadata(
            p.rel,
            mode=None if e.kind == "symlink" else stat.S_IMODE(e.mode),
            owner=(e.uid, e.gid) if os.geteuid() == 0 else None,
            times_ns=(e.atime_ns, e.mtime_ns) if times else None,
        )
    except UnsafePath as exc:
        report.metadata_errors.append(exc.message)
    except (OSError, OverflowError) as exc:
        report.metadata_errors.append(f"{printable(e.path)}: {getattr(exc, 'strerror', None) or exc}")


class TreeWriter:
    """Writes planned entries below a SafeRoot: directories and files (hard links) first, symlinks last,
    directory metadata deepest first. Shared by files restore and the hybrid restore."""

    def __init__(self, dest: SafeRoot, reader: Reader, report: RestoreReport) -> None:
        self.dest, self.reader, self.report = dest, reader, report
        self.first_of: dict[str, str] = {}
        self.dirs: list[Planned] = []

    def skip(self, p: Planned, why: str) -> None:
        self.report.skipped.append(f"{printable(p.entry.path)[:200]}: {why}")

    def put_dir(self, p: Planned) -> bool:
        st = self.dest.lstat(p.rel)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self.dest.remove(p.rel)
        self.dest.mkdir(p.rel)
        self.dirs.append(p)
        self.report.dirs += 1
        return True

    def put_file(self, p: Planned) -> bool:
        """False when nothing was written (unreadable at backup time)."""
        e = p.entry
        if e.error:  # the damaged guest file system would not hand it out at backup time
            self.report.metadata_errors.append(f"{printable(e.path)}: not in the backup ({e.error})")
            return False
        st = self.dest.lstat(p.rel)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.dest.remove(p.rel)
        group = p.group
        if group and group in self.first_of:
            try:
                if st is not None:
                    self.dest.remove(p.rel)
                self.dest.link(self.first_of[group], p.rel)
                self.report.hardlinks += 1
                return True
            except OSError:
                pass  # another file system, or no hard links there: a copy instead
        self.report.bytes += self.dest.write_file(p.rel, self.reader(p.raw), e.size)
        self.report.files += 1
        if group:
            self.first_of[group] = p.rel
        return True

    def put_symlink(self, p: Planned) -> bool:
        if self.dest.lstat(p.rel) is not None:
            self.dest.remove(p.rel)
        try:
            self.dest.symlink(p.entry.target or "", p.rel)
        except OSError as exc:
            self.report.metadata_errors.append(f"{printable(p.entry.path)}: symlink: {exc.strerror}")
            return False
        self.report.symlinks += 1
        return True

    def put(self, p: Planned) -> bool:
        """One entry with its metadata (directories: at finish); False if not written."""
        kind = p.entry.kind
        try:
            if kind == "dir":
                return self.put_dir(p)
            done = self.put_file(p) if kind == "file" else self.put_symlink(p)
        except UnsafePath as exc:
            self.report.skipped.append(exc.message)
            return False
        except OSError as exc:
            self.skip(p, f"not written ({exc.strerror or exc})")
            return False
        if done:
            apply_metadata(self.dest, p, self.report)
        return done

    def write(self, plan: list[Planned]) -> None:
        for p in plan:
            if p.entry.kind in ("dir", "file"):
                self.put(p)
            elif p.entry.kind == "other":
                self.report.other += 1  # devices, fifos, sockets: listed in the catalog, not recreated
        for p in plan:  # last: no symlink of this restore is ever the parent of a write
            if p.entry.kind == "symlink":
                self.put(p)
        self.finish()

    def finish(self) -> None:
        for p in sorted(self.dirs, key=lambda d: -d.rel.count("/")):  # deepest first: children are written
            apply_metadata(self.dest, p, self.report)


def restore_entries(
    entries: list[dict], reader: Reader, root: Path, overwrite: bool = False
) -> RestoreReport:
    """Write `entries` under `root`, each at root + its path; unsafe entries are skipped and reported."""
    report = RestoreReport()
    plan = plan_entries(entries, report)
    with SafeRoot(root) as dest:
        there = _existing(plan, dest)
        clash = [p.rel for p in plan if p.rel in there and _in_the_way(p, there[p.rel])]
        if clash and not overwrite:
            raise HotvmError(
                f"{len(clash)} file(s) already exist or are in the way in {root} "
                f"(first: {printable(str(root / clash[0]))})",
                "restore into another directory with --to, or pass --overwrite",
            )
        TreeWriter(dest, reader, report).write(plan)
    return report


def restore_paths(repo: Any, ref: Any, paths: list[str], to: Path, overwrite: bool = False) -> dict:
    """`hotvm files restore`: the chosen files and directories of one set (browse.SetRef) into `to`, with
    their metadata; the report says what was restored and what was skipped."""
    from hotvm.files.browse import open_view, select  # browse reads sets; this module only writes files

    with open_view(repo, ref) as view:
        report = restore_entries(select(view.entries, paths), view.read, to, overwrite=overwrite)
    return {"vm": ref.vm, "backup_id": ref.backup_id, "kind": ref.kind, "to": str(to), **report.as_dict()}

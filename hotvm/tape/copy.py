"""Tape copies of an image repository (seed Table 7.3: weekly to tape, kept two months), plain Python.

    scan_library   read every medium forward: labels, archives, catalogs (the tapes are the truth)
    plan_media     which media a new copy may use: append to the current one, blank ones, expired ones
    copy_to_tape   per set one tar archive (the set's files + every chunk it references), then a catalog
    restore_from_tape   read a set's archive forward (across media) and write its disks, verifying chunks

Chunks and files are copied exactly as stored: an encrypted repository stays encrypted on tape (the key
is needed to restore, never to copy).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import secrets
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from hotvm.config import TargetConfig
from hotvm.errors import BackupSetError, ChecksumMismatch, HotvmError
from hotvm.formats.bounds import DOCUMENT_MAX, chunk_max, set_file_max
from hotvm.formats.manifest import DiskRecord, Manifest, Place, utcnow
from hotvm.formats.repository import MARKER, Repository, manifest_problem, read_marker
from hotvm.formats.restore import (
    DiskFormat,
    disk_file_name,
    disk_output,
    place,
    unpack_config,
    verify_chunk,
)
from hotvm.tape.drive import BLOCK, EARLY_WARNING, EndOfData, EndOfMedium, Library, TapeError
from hotvm.tape.format import (
    ARCHIVE,
    CATALOG,
    LABEL,
    RECORD_PAYLOAD,
    ChainReader,
    FileWriter,
    read_file_records,
    unframe,
)

CATALOG_FORMAT = "hotvm-tape-catalog"
DEFAULT_KEEP_DAYS = 60


class TapeFull(TapeError):
    """No medium the copy may write on is left (every one holds a copy that has not expired)."""


# --------------------------------------------------------------------------- what the library holds


@dataclass
class TapeFile:
    number: int
    kind: str  # label, archive, catalog
    info: dict = field(default_factory=dict)
    """Label: its JSON. Catalog: the catalog. Archive: {} (its contents are in the catalog)."""


@dataclass
class MediumState:
    medium: str
    files: list[TapeFile] = field(default_factory=list)
    remaining: int | None = None
    """Blocks that can still be written (None: the drive cannot tell)."""

    @property
    def blank(self) -> bool:
        return not self.files

    @property
    def labels(self) -> list[dict]:
        return [f.info for f in self.files if f.kind == "label"]


def scan_medium(library: Library, medium: str) -> MediumState:
    """Read one medium from its beginning to the end of its data (forward only)."""
    drive = library.load(medium)
    state = MediumState(medium)
    catalog_parts: list[bytes] = []
    try:
        drive.rewind()
        number = 0
        while True:
            try:
                first = drive.read_block()
            except EndOfData:
                break
            if first is None:  # an empty tape file (never written by hotvm): skip it
                number += 1
                continue
            kind, payload = unframe(first, medium)
            if kind == LABEL:
                rest = b"".join(p for _, p in read_file_records(drive))
                state.files.append(TapeFile(number, "label", json.loads(payload + rest)))
            elif kind == CATALOG:
                body = payload + b"".join(p for _, p in read_file_records(drive))
                catalog_parts.append(body)
                state.files.append(TapeFile(number, "catalog", {"raw": body}))
            else:
                drive.fsf(1)
                state.files.append(TapeFile(number, "archive"))
            number += 1
        state.remaining = drive.remaining()
    finally:
        drive.close()
    return state


def scan_library(library: Library) -> list[MediumState]:
    return [scan_medium(library, m) for m in library.media]


def catalogs_from_scan(states: list[MediumState]) -> list[dict]:
    """Every complete copy's catalog, read from the tapes alone. A catalog cut at the end of a medium is
    joined with its continuation (the first file after the copy's label on the next medium, in the order
    of the labels' `sequence`); a copy whose catalog was never written (interrupted) has none."""
    fragments: dict[str, list[tuple[int, bytes]]] = {}
    for state in states:
        label: dict = {}
        for f in state.files:
            if f.kind == "label":
                label = f.info
            elif f.kind == "catalog":
                key = label.get("copy_id", "")
                fragments.setdefault(key, []).append((label.get("sequence", 0), f.info["raw"]))
    catalogs = []
    for parts in fragments.values():
        try:
            catalog = json.loads(b"".join(raw for _, raw in sorted(parts, key=lambda p: p[0])))
        except ValueError:
            continue  # the rest of it is on a medium that was not scanned, or it is damaged
        if isinstance(catalog, dict) and catalog.get("format") == CATALOG_FORMAT:
            catalogs.append(catalog)
    return sorted(catalogs, key=lambda c: c["created"])


# --------------------------------------------------------------------------- retention of media (pure)


def copy_expiry(catalogs: Iterable[dict]) -> dict[str, dt.datetime]:
    return {c["copy_id"]: dt.datetime.fromisoformat(c["expires"]) for c in catalogs}


def medium_expires(state: MediumState, expiry: dict[str, dt.datetime]) -> dt.datetime | None:
    """When every complete copy on the medium has expired; None if it holds no complete copy (blank, or
    only the remains of copies that never finished: they protect nothing)."""
    times = [expiry[lab["copy_id"]] for lab in state.labels if lab.get("copy_id") in expiry]
    return max(times) if times else None


def reusable(state: MediumState, expiry: dict[str, dt.datetime], now: dt.datetime) -> bool:
    """A medium may be relabelled (erased) only when it is blank or every complete copy on it expired."""
    until = medium_expires(state, expiry)
    return until is None or until <= now


@dataclass(frozen=True)
class MediumPlan:
    medium: str
    action: str  # append | blank | relabel
    blocks: int | None
    """Blocks this copy may write there (None: unknown)."""
    files: int = 0
    """Tape files already on it (append: the number of the first file this copy writes there)."""


def plan_media(
    states: list[MediumState], catalogs: list[dict], now: dt.datetime, blocks_per_medium: int | None
) -> list[MediumPlan]:
    """The media a new copy may use, in order: after the end of the newest unexpired copy on its last
    medium, then blank media, then media whose copies all expired (soonest expired first). A medium
    holding a copy that has not expired is never erased."""
    expiry = copy_expiry(catalogs)
    by_name = {s.medium: s for s in states}
    plan: list[MediumPlan] = []
    live = [c for c in catalogs if expiry[c["copy_id"]] > now]
    if live:
        newest = max(live, key=lambda c: c["created"])["copy_id"]
        holding = [(lab.get("sequence", 0), s.medium) for s in states for lab in s.labels
                   if lab.get("copy_id") == newest]
        last = by_name.get(max(holding)[1]) if holding else None
        if last is not None and (last.remaining is None or last.remaining > 2):
            plan.append(MediumPlan(last.medium, "append", last.remaining, len(last.files)))
    used = {p.medium for p in plan}
    fresh = blocks_per_medium - 2 if blocks_per_medium else None  # minus the label and its filemark
    plan += [MediumPlan(s.medium, "blank", fresh) for s in states if s.blank and s.medium not in used]
    expired = [s for s in states if not s.blank and s.medium not in used and reusable(s, expiry, now)]
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    expired.sort(key=lambda s: (medium_expires(s, expiry) or oldest, s.medium))
    plan += [MediumPlan(s.medium, "relabel", fresh) for s in expired]
    return plan


def blocking_copies(states: list[MediumState], catalogs: list[dict], now: dt.datetime) -> str:
    expiry = copy_expiry(catalogs)
    soonest = min((medium_expires(s, expiry) for s in states if not reusable(s, expiry, now)), default=None)
    return f"the first medium expires {soonest:%Y-%m-%d %H:%M} UTC" if soonest else "no medium is usable"


# --------------------------------------------------------------------------- writing a copy


def _now_iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat()


class CopyWriter:
    """Writes the tape files of one copy, moving to the next planned medium at the end of a medium."""

    def __init__(self, library: Library, plan: list[MediumPlan], label: dict) -> None:
        self.library, self.plan, self.label = library, list(plan), label
        self.drive = None
        self.media: list[str] = []
        self.file_number = 0
        self.current: dict | None = None  # the tape file being written: kind, parts, size

    def _next_medium(self, continues: dict | None) -> None:
        if self.drive is not None:
            self.drive.close()
        if not self.plan:
            raise TapeFull(
                f"tape library '{self.library.name}' ran out of media during copy {self.label['copy_id']}",
                "add media (media=N in the tape url) or shorten keep.days; the unfinished copy protects "
                "nothing and its media will be reused",
            )
        step = self.plan.pop(0)
        self.drive = self.library.load(step.medium)
        if step.action == "append":
            self.drive.eod()
            self.file_number = step.files
        else:
            self.drive.erase()
            self.file_number = 0
        self.media.append(step.medium)
        label = {**self.label, "medium": step.medium, "sequence": len(self.media), "continues": continues}
        self.drive.write_block(_frame_label(label))
        self.drive.write_filemark()
        self.file_number += 1

    def begin(self, kind: bytes, name: str) -> FileWriter:
        if self.drive is None:
            self._next_medium(None)
        self.current = {"kind": kind, "name": name, "parts": [self._part(0)], "size": 0}
        return FileWriter(kind, self._put)

    def _part(self, offset: int) -> dict:
        return {"medium": self.media[-1], "file": self.file_number, "offset": offset}

    def _put(self, kind: bytes, payload: bytes) -> None:
        from hotvm.tape.format import frame

        block = frame(kind, payload)
        try:
            self.drive.write_block(block)
        except EndOfMedium:
            self.drive.write_filemark()  # the early-warning zone always has room for it
            cur = self.current
            kind_name = {ARCHIVE: "archive", CATALOG: "catalog"}[cur["kind"]]
            self._next_medium({"kind": kind_name, "name": cur["name"], "offset": cur["size"]})
            cur["parts"].append(self._part(cur["size"]))
            self.drive.write_block(block)
        self.current["size"] += len(payload)

    def end(self, writer: FileWriter) -> dict:
        writer.flush_all()
        self.drive.write_filemark()
        self.file_number += 1
        done, self.current = self.current, None
        return done

    def close(self) -> None:
        if self.drive is not None:
            self.drive.close()
            self.drive = None


def _frame_label(label: dict) -> bytes:
    from hotvm.tape.format import frame

    return frame(LABEL, json.dumps(label, sort_keys=True).encode())


def set_members(repo: Repository, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(the set's files, the chunk paths it references in order of first use): what its archive holds."""
    set_dir = repo.set_path(manifest.vm, manifest.backup_id)
    files = _walk(repo, set_dir)
    files.sort(key=lambda p: (not p.endswith("/manifest.json"), p))  # the manifest first: restore needs it
    seen: dict[str, None] = {}
    for disk in manifest.disks:
        for entry in disk.chunks:  # bases and patches: a set on tape restores on its own
            seen.setdefault(repo.chunk_path(entry[1]))
    return files, list(seen)


def _walk(repo: Repository, path: str) -> list[str]:
    out = []
    for entry in repo.target.scan(path):
        name = f"{path}/{entry.name}"
        if entry.is_dir or (entry.is_dir is None and repo.target.listdir(name)):
            out += _walk(repo, name)
        else:
            out.append(name)
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o600
    tar.addfile(info, io.BytesIO(data))


def estimate_blocks(repo: Repository, members: list[list[str]]) -> int:
    """Blocks the archives will take (sizes from listings; tar headers and padding included): the copy
    refuses to start when the library cannot hold it, rather than failing on the last medium."""
    sizes: dict[str, int] = {}
    total = 0
    for paths in members:
        size = 2 * 1024 + 10240 + 2048  # marker, end-of-archive blocks, record padding
        for path in paths:
            directory = path.rsplit("/", 1)[0]
            if path not in sizes:
                sizes.update({f"{directory}/{e.name}": e.size if e.size is not None else 4 << 20
                              for e in repo.target.scan(directory)})
            size += 1536 + -(-sizes.get(path, 4 << 20) // 512) * 512  # pax + ustar header, data
        total += -(-size // RECORD_PAYLOAD) + 1
    return total + 4


def copy_to_tape(
    repo: Repository,
    library: Library,
    *,
    target_name: str,
    vms: list[str] | None = None,
    keep_days: int = DEFAULT_KEEP_DAYS,
    now: dt.datetime | None = None,
) -> dict:
    """Copy the newest state of the repository (every complete set, or those of `vms`) to the library as
    one new copy; returns its catalog (also written on the tape, after the archives)."""
    now = now or utcnow()
    marker = read_marker(repo.target)
    if marker is None:
        raise BackupSetError(f"target '{target_name}' holds no hotvm repository", "back something up first")
    repo.unlock()
    sets = [e.manifest for e in repo.list_sets() if e.manifest and (not vms or e.vm in vms)]
    if not sets:
        raise BackupSetError(
            f"no complete backup {'of ' + ', '.join(vms) + ' ' if vms else ''}on target '{target_name}'",
            "run a backup first, or check the VM names",
        )
    states = scan_library(library)
    catalogs = catalogs_from_scan(states)
    blocks = library.capacity // (BLOCK + 1) - EARLY_WARNING if library.capacity else None
    plan = plan_media(states, catalogs, now, blocks)
    members = [set_members(repo, m) for m in sets]
    need = estimate_blocks(repo, [f + c for f, c in members])
    have = sum(p.blocks - 2 for p in plan) if all(p.blocks is not None for p in plan) else None
    if not plan or (have is not None and have < need):
        raise TapeFull(
            f"tape library '{library.name}' is full: the copy needs about {need * RECORD_PAYLOAD >> 20} MiB, "
            f"{(have or 0) * RECORD_PAYLOAD >> 20} MiB can be written without overwriting a copy that has "
            f"not expired ({blocking_copies(states, catalogs, now)})",
            "add media (media=N in the tape url), shorten the tape's keep.days, or copy fewer VMs",
        )
    copy_id = f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"
    expires = now + dt.timedelta(days=keep_days)
    label = {"format": "hotvm-tape-label", "version": 1, "library": library.name, "copy_id": copy_id,
             "created": _now_iso(now), "expires": _now_iso(expires)}
    writer = CopyWriter(library, plan, label)
    mtime = now.timestamp()
    held = [(m.vm, m.backup_id) for m in sets]
    with repo.hold(f"tape copy {copy_id} to '{library.name}'", held):
        return _write_copy(repo, writer, sets, members, marker, mtime, catalog_head={
            "format": CATALOG_FORMAT, "version": 1, "copy_id": copy_id, "tape": library.name,
            "target": target_name, "repository": marker, "created": _now_iso(now),
            "expires": _now_iso(expires), "keep_days": keep_days,
        })


def _write_copy(repo: Repository, writer: CopyWriter, sets: list, members: list, marker: dict, mtime: float,
                catalog_head: dict) -> dict:
    """Each set as one tar archive (its files, then every chunk it references), then the catalog."""
    entries = []
    try:
        for manifest, (files, chunks) in zip(sets, members, strict=True):
            name = f"{manifest.vm}/{manifest.backup_id}"
            out = _Hashing(writer.begin(ARCHIVE, name))
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, MARKER, json.dumps(marker, indent=2).encode(), mtime)
                chunk_limit = chunk_max(max((d.chunk_size for d in manifest.disks), default=0))
                for path in files:
                    _add(tar, path, repo.target.read_bytes(path, set_file_max(path)), mtime)
                for path in chunks:
                    _add(tar, path, repo.target.read_bytes(path, chunk_limit), mtime)
            done = writer.end(out.inner)
            entries.append({
                "vm": manifest.vm, "backup_id": manifest.backup_id,
                "completed_at": manifest.completed_at.isoformat(), "parts": done["parts"],
                "size": done["size"], "sha256": out.digest.hexdigest(), "files": len(files),
                "chunks": len(chunks),
                "disks": [d.device for d in manifest.disks],
            })
        catalog = {**catalog_head, "media": writer.media, "sets": entries}
        out = writer.begin(CATALOG, "catalog")
        out.write(json.dumps(catalog, indent=1, sort_keys=True).encode())
        writer.end(out)  # (if the catalog spilled onto one more medium, its label there says so)
    finally:
        writer.close()
    return catalog


class _Hashing:
    def __init__(self, inner: FileWriter) -> None:
        self.inner, self.digest = inner, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.inner.write(data)


def catalog_path(tape: str, copy_id: str) -> str:
    return f"tapes/{tape}/catalog-{copy_id}.json"


def _catalog_checksum(catalog: dict) -> str:
    body = {k: v for k, v in catalog.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store_catalog(repo: Repository, catalog: dict) -> str:
    """Keep the copy's catalog in the source repository too (the tapes hold it as well), with a checksum
    of its canonical JSON (bit rot in a catalog on the target is never taken for a copy's contents)."""
    path = catalog_path(catalog["tape"], catalog["copy_id"])
    stored = {**catalog, "checksum": _catalog_checksum(catalog)}
    repo.write_file(path, json.dumps(stored, indent=1, sort_keys=True).encode())
    return path


def stored_catalogs(repo: Repository, tape: str) -> list[dict]:
    """The catalogs kept on the target for `tape`: only those that parse, match their checksum (if they
    have one: older hotvm wrote none) and lie where they say (their tape and copy id)."""
    catalogs = []
    for name in sorted(repo.target.listdir(f"tapes/{tape}")):
        if not name.startswith("catalog-") or ".tmp-" in name:
            continue
        try:
            catalog = json.loads(repo.read_file(f"tapes/{tape}/{name}", limit=DOCUMENT_MAX))
        except (FileNotFoundError, ValueError, ChecksumMismatch):
            continue
        if not isinstance(catalog, dict) or not isinstance(catalog.get("sets"), list):
            continue
        if catalog_path(str(catalog.get("tape")), str(catalog.get("copy_id"))) != f"tapes/{tape}/{name}":
            continue
        if "checksum" in catalog and catalog.pop("checksum") != _catalog_checksum(catalog):
            continue
        catalogs.append(catalog)
    return catalogs


# --------------------------------------------------------------------------- restoring from tape


def find_set(catalogs: list[dict], vm: str, backup_id: str | None, now: dt.datetime | None = None) -> dict:
    """The set's entry in the newest copy that holds it (the newest set of `vm` if no id is given)."""
    found = [(c, s) for c in catalogs for s in c["sets"]
             if s["vm"] == vm and (backup_id is None or s["backup_id"] == backup_id)]
    if not found:
        raise BackupSetError(
            f"no tape copy holds {'backup ' + backup_id + ' of ' if backup_id else 'a backup of '}VM '{vm}'",
            "run 'hotvm tape list' to see what the tapes hold",
        )
    catalog, entry = max(found, key=lambda cs: (cs[1]["backup_id"], cs[0]["created"]))
    return {**entry, "copy_id": catalog["copy_id"], "repository": catalog["repository"]}


def read_archive(library: Library, entry: dict) -> Iterator[bytes]:
    """The archive's bytes, read forward part after part (one part per medium it spans), checked
    against the size and sha256 of the catalog."""
    digest, size = hashlib.sha256(), 0
    for part in entry["parts"]:
        drive = library.load(part["medium"])
        try:
            drive.rewind()
            drive.fsf(part["file"])
            for kind, payload in read_file_records(drive):
                if kind != ARCHIVE:
                    raise TapeError(
                        f"file {part['file']} on medium {part['medium']} is not an archive",
                        "the catalog does not match the tapes: rebuild it with 'hotvm tape list --scan'",
                    )
                digest.update(payload)
                size += len(payload)
                yield payload
        finally:
            drive.close()
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise ChecksumMismatch(
            f"the tape archive of {entry['vm']}/{entry['backup_id']} does not match its catalog checksum",
            "the tape is damaged; restore from another copy",
        )


def restore_from_tape(
    library: Library,
    catalogs: list[dict],
    vm: str,
    backup_id: str | None,
    dest: Path,
    fmt: DiskFormat = "qcow2",
    key_config: TargetConfig | None = None,
) -> dict:
    """Write the disks and config of a set straight from tape into `dest` (one forward pass), verifying
    every chunk like a restore from the target does. An encrypted copy needs the key of the source target
    (`key_config`: its encryption_key_env / encryption_key_secret)."""
    entry = find_set(catalogs, vm, backup_id)
    with tempfile.TemporaryDirectory(prefix="hotvm-tape-") as scratch, ExitStack() as outputs:
        marker_dir = Path(scratch)
        repo: Repository | None = None
        manifest: Manifest | None = None
        set_prefix = ""
        places: dict[str, list[tuple[int, Place, DiskRecord]]] = {}
        seen: set[str] = set()
        config_blob = None
        restored = []
        stream = ChainReader(read_archive(library, entry))
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                blob = tar.extractfile(member).read()
                name = member.name
                if name == MARKER:
                    (marker_dir / MARKER).write_bytes(blob)
                    repo = _marker_repository(marker_dir, key_config, entry)
                elif repo is None:
                    raise BackupSetError("tape archive does not start with the repository marker",
                                         "the tape was not written by hotvm tape copy")
                elif name.endswith("/manifest.json"):
                    manifest = _tape_manifest(repo, name, blob, vm, entry)
                    set_prefix = name.removesuffix("/manifest.json")
                    for disk in manifest.disks:
                        path = dest / disk_file_name(disk.device, fmt)
                        fd = outputs.enter_context(disk_output(path, fmt, disk.virtual_size))
                        restored.append({"device": disk.device, "path": str(path), "format": fmt,
                                         "bytes": disk.virtual_size})
                        for digest, where in disk.places().items():
                            places.setdefault(digest, []).extend((fd, p, disk) for p in where)
                elif name.startswith("chunks/"):
                    if manifest is None:
                        raise BackupSetError("tape archive holds chunks before its manifest",
                                             "the tape was not written by hotvm tape copy")
                    digest = name.rsplit("/", 1)[1]
                    targets = places.get(digest, [])
                    if targets:
                        _, first, disk = targets[0]  # writes never overlap: any order of chunks works
                        data = verify_chunk(repo, disk, first.index, digest, _opener(repo, name, blob),
                                            first.length if first.patch else None)
                        for fd, where, disk in targets:
                            if len(data) != where.length:
                                raise ChecksumMismatch(
                                    f"chunk {where.index} of disk '{disk.device}' does not fit its entry",
                                    "the manifest is damaged; restore from another copy")
                            place(fd, data, where)
                        seen.add(digest)
                elif (manifest and manifest.config_archive
                      and name == f"{set_prefix}/{manifest.config_archive.name}"):
                    config_blob = repo.open_blob(name, blob, "config archive")
        if manifest is None:
            raise BackupSetError(f"the tape archive of {vm} holds no manifest", "restore from another copy")
        missing = set(places) - seen
        if missing:
            raise BackupSetError(
                f"{len(missing)} chunk(s) of {vm}/{manifest.backup_id} are missing from the tape archive",
                "restore from another copy",
            )
    config_files = unpack_config(manifest, config_blob, dest) if config_blob is not None else []
    return {"vm": vm, "backup_id": manifest.backup_id, "to": str(dest), "copy_id": entry["copy_id"],
            "disks": restored, "config_files": config_files, "boot_check": None}


def _tape_manifest(repo: Repository, name: str, blob: bytes, vm: str, entry: dict) -> Manifest:
    """The set's manifest from a tape archive, trusted only as far as a target's would be: valid,
    checksummed, lying where it says, and the set the catalog promised."""
    try:
        manifest = Manifest.model_validate_json(repo.open_blob(name, blob, f"manifest of {vm}"))
    except ValueError as exc:
        raise BackupSetError(f"the manifest of {vm} on tape is unreadable: {str(exc).splitlines()[0]}",
                             "the tape is damaged; restore from another copy") from None
    problem = manifest_problem(manifest, name.removesuffix("/manifest.json"))
    if problem is None and (manifest.vm, manifest.backup_id) != (entry["vm"], entry["backup_id"]):
        problem = (f"it is {manifest.vm}/{manifest.backup_id}, "
                   f"not the catalog's {entry['vm']}/{entry['backup_id']}")
    if problem:
        raise ChecksumMismatch(f"the manifest of {vm} on tape copy {entry['copy_id']}: {problem}",
                               "the tape is damaged or was tampered with; restore from another copy")
    return manifest


def _opener(repo: Repository, path: str, blob: bytes):  # noqa: ANN202
    return lambda: repo.open_blob(path, blob, f"chunk {path.rsplit('/', 1)[1][:16]}… on tape")


def _marker_repository(directory: Path, key_config: TargetConfig | None, entry: dict) -> Repository:
    """A repository holding only the marker: it opens the copy's encryption with the configured key."""
    from hotvm import credentials
    from targets import open_target

    url = f"file://{directory}"
    name = f"tape copy {entry['copy_id']}"
    cfg = (key_config.model_copy(update={"url": url, "name": name}) if key_config
           else TargetConfig(name=name, url=url))
    if key_config is None and json.loads((directory / MARKER).read_bytes()).get("encryption"):
        raise HotvmError(
            f"tape copy {entry['copy_id']} is of an encrypted repository",
            "configure the source target (with its encryption_key_env/secret) in hotvm.yaml: its key is "
            "needed to restore",
        )
    # A local scratch directory: nothing to remember, no connection to close.
    return Repository(open_target(cfg), credentials.encryption_key(key_config), remember=False)

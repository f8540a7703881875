"""Copies of a repository on a second target (`hotvm copy`, the offsite-copy flow): 3-2-1-1-0's offsite copy.

The destination becomes a second location of the SAME repository (same marker, same key), so everything
is copied as stored: encrypted files stay encrypted (their authentication covers the path, which is the
same), nothing is decrypted or re-encrypted, and any hotvm that opens the source opens the copy.

    marker          a destination without a repository gets the source's marker; a different one is refused
    which sets      every complete set (image, file) the destination lacks; with the destination's own
                    `keep:`, only those its retention would keep (so a pruned copy is not copied again)
    chunks first    the ones the destination lacks (one listing of chunks/), each verified before
                    it is sent (authenticated, decompressed, hashed against its name)
    set files       every file of the set dir the destination lacks (disk journals, config archive, ...),
                    manifest.json LAST, once every chunk it references is there: no half set ever looks
                    complete; a rerun skips what arrived (only the file or chunk being written when the
                    copy was killed is sent again)
    documents       inventory/ and plan/ files the destination lacks (or whose size differs)

Restore-test records (a set's restore-tests/) are not copied: they say the *source* was verified; the
copy gets its own from `hotvm verify --target`.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import zstandard
from pydantic import BaseModel

from hotvm import immutability, retention
from hotvm.config import Config, Keep, TargetConfig
from hotvm.config_file import load_config
from hotvm.errors import BackupSetError, ChecksumMismatch, ConfigError, TargetConfigError
from hotvm.formats.bounds import DOCUMENT_MAX, MANIFEST_MAX, MARKER_MAX, chunk_max, set_file_max
from hotvm.formats.export import decompress_bounded
from hotvm.formats.manifest import utcnow
from hotvm.formats.repository import MARKER, Repository, read_marker
from hotvm.retention import BackupPoint, SetState
from targets.base import Target

FILE_CHUNK_MAX = 8 << 20
"""Largest plain size of a file set's chunk (hotvm/check.py has the same bound)."""
SKIPPED_DIRS = ("restore-tests",)
DOCUMENT_DIRS = ("inventory", "plan")
TMP_MARK = ".tmp-"
DEFAULT_WORKERS = 8


class CopiedSet(BaseModel):
    kind: str
    vm: str
    backup_id: str
    action: str
    """copied | present (the destination had it complete) | skipped (the reason says why)."""
    reason: str = ""
    files_sent: int = 0
    bytes_sent: int = 0


class CopyReport(BaseModel):
    source: str
    destination: str
    source_url: str
    destination_url: str
    marker_created: bool = False
    sets: list[CopiedSet] = []
    chunks_referenced: int = 0
    chunks_present: int = 0
    """Referenced chunks the destination already had (not sent)."""
    chunks_sent: int = 0
    chunk_bytes_sent: int = 0
    files_sent: int = 0
    """Set files and documents sent (manifests, journals, config archives, inventory, plans)."""
    bytes_sent: int = 0
    """Every byte this run wrote to the destination."""
    documents_sent: int = 0
    locks_extended: int = 0
    immutable_until: dt.datetime | None = None
    """Destination with Object Lock: until when what this run wrote is locked."""
    seconds: float = 0.0

    @property
    def copied(self) -> list[CopiedSet]:
        return [s for s in self.sets if s.action == "copied"]

    def summary(self) -> dict:
        return {**self.model_dump(mode="json"), "copied": len(self.copied),
                "mib_per_s": round(self.bytes_sent / 2**20 / self.seconds, 1) if self.seconds else None}


@dataclass
class SourceSet:
    kind: str  # image | files
    vm: str
    backup_id: str
    path: str
    completed_at: dt.datetime
    refs: dict[str, int]
    """Chunk name -> largest plain size it may have (the decompression bound)."""


# --------------------------------------------------------------------------- what the source holds


def source_sets(repo: Repository, vms: Iterable[str] | None = None) -> list[SourceSet]:
    """Every complete set of the source (image and file sets), authenticated (manifests parsed)."""
    from hotvm.prune import list_file_sets, list_sets

    wanted = set(vms) if vms else None
    out = []
    for listing in list_sets(repo):
        m = listing.manifest
        if m is None or (wanted and m.vm not in wanted):
            continue
        refs: dict[str, int] = {}
        for disk in m.disks:
            for digest in disk.digests():  # a patched chunk lists its base too
                refs[digest] = max(refs.get(digest, 0), disk.chunk_size)
        out.append(SourceSet("image", m.vm, m.backup_id, listing.point.path, m.completed_at, refs))
    for f in list_file_sets(repo):
        m = f.manifest
        if m is None or (wanted and m.vm not in wanted):
            continue
        refs = dict.fromkeys(m.chunks(), FILE_CHUNK_MAX)
        out.append(SourceSet("files", m.vm, m.backup_id, f.point.path, m.completed_at, refs))
    if wanted:
        missing = sorted(wanted - {s.vm for s in out})
        if missing:
            raise BackupSetError(
                f"no complete backup of {', '.join(missing)} on target '{repo.target.name}'",
                "check the VM names (hotvm list --target " + repo.target.name + ")",
            )
    return out


# --------------------------------------------------------------------------- the copy


class Copier:
    """One copy run from `src` (opened with its key) to the raw target `dst`."""

    def __init__(self, src: Repository, dst: Target, workers: int = DEFAULT_WORKERS) -> None:
        self.src, self.dst, self.workers = src, dst, workers
        self.report = CopyReport(source=src.target.name, destination=dst.name,
                                 source_url=src.target.display(), destination_url=dst.display())
        self._count = threading.Lock()
        self._made_dirs: set[str] = set()

    # ---- sending: every byte written to the destination goes through here (the report counts it)
    def send(self, path: str, blob: bytes) -> int:
        self.dst.write_bytes(path, blob)
        with self._count:
            self.report.bytes_sent += len(blob)
        return len(blob)

    # ---- the repository
    def match_repository(self) -> None:
        """The destination must be this repository (or none yet: it gets the source's marker)."""
        if not self.src.unlock():
            raise BackupSetError(
                f"target '{self.src.target.name}' holds no hotvm repository to copy",
                "check --from (hotvm list --target NAME shows what a target holds)",
            )
        blob = self.src.target.read_bytes(MARKER, MARKER_MAX)
        mine = read_marker(self.src.target)
        theirs = read_marker(self.dst, "copy with a newer hotvm")
        if theirs is None:
            # Refused if this host knew a repository there (an unmounted or wiped copy is not re-seeded).
            Repository(self.dst, self.src.key).unlock()
            self.dst.check()
            self.send(MARKER, blob)
            self.report.marker_created = True
        elif theirs != mine:
            raise TargetConfigError(
                f"target '{self.dst.name}' holds another hotvm repository than target "
                f"'{self.src.target.name}' (another repository, or another key)",
                f"copy into an empty target or prefix, or into a copy of '{self.src.target.name}'",
            )

    def present_sets(self, sets: list[SourceSet]) -> dict[str, set[str]]:
        """Set path -> the files (relative paths) the destination already has of it (one listing per VM
        directory, then one per set directory that exists there)."""
        vm_dirs = {s.path.rsplit("/", 1)[0] for s in sets}
        with ThreadPoolExecutor(self.workers) as pool:
            listed = dict(zip(vm_dirs, pool.map(self.dst.listdir, vm_dirs), strict=True))
        there = [s.path for s in sets if s.path.rsplit("/", 1)[1] in listed[s.path.rsplit("/", 1)[0]]]
        with ThreadPoolExecutor(self.workers) as pool:
            have = dict(zip(there, pool.map(self.dst_files, there), strict=True))
        return {s.path: have.get(s.path, set()) for s in sets}

    # ---- chunks
    def dst_chunks(self, names: Iterable[str]) -> set[str]:
        """Which of `names` the destination has: one listing per chunks/ prefix involved, or one exists()
        per chunk when that is fewer round trips."""
        names = set(names)
        flat = self.dst.list_flat("chunks") if names else []
        if flat is not None:  # an object store: one request per 1000 chunks
            return names & {f.rsplit("/", 1)[-1] for f in flat if TMP_MARK not in f}
        prefixes = sorted({n[:2] for n in names})
        if len(names) <= len(prefixes):
            with ThreadPoolExecutor(self.workers) as pool:
                found = pool.map(lambda n: (n, self.dst.exists(Repository.chunk_path(n))), sorted(names))
                return {n for n, there in found if there}

        def listing(prefix: str) -> set[str]:
            return {n for n in self.dst.listdir(f"chunks/{prefix}") if TMP_MARK not in n}

        with ThreadPoolExecutor(self.workers) as pool:
            have = set().union(*pool.map(listing, prefixes)) if prefixes else set()
        return names & have

    def copy_chunk(self, digest: str, max_size: int) -> int:
        """Read the stored blob, verify it (what restore checks), send it as stored."""
        path = Repository.chunk_path(digest)
        try:
            blob = self.src.target.read_bytes(path, chunk_max(max_size))
        except FileNotFoundError:
            raise BackupSetError(
                f"chunk {digest[:16]}… is missing from target '{self.src.target.name}'",
                f"run 'hotvm check --target {self.src.target.name}'; the copy skips nothing silently",
            ) from None
        verify_blob(self.src, digest, blob, max_size)
        return self.send(path, blob)

    # ---- set files
    def src_files(self, set_path: str) -> list[str]:
        return self._files(self.src.target, set_path)

    def dst_files(self, set_path: str) -> set[str]:
        return set(self._files(self.dst, set_path))

    @staticmethod
    def _files(target: Target, set_path: str, sub: str = "") -> list[str]:
        """Relative paths of every file under a set dir (one level of subdirectories: disks/, volumes/ and
        whatever a newer format adds), without torn uploads and restore-test records."""
        out = []
        for entry in target.scan(f"{set_path}/{sub}".rstrip("/")):
            name = f"{sub}/{entry.name}" if sub else entry.name
            if TMP_MARK in entry.name or entry.name.startswith(".hotvm-probe"):
                continue
            is_dir = entry.is_dir if entry.is_dir is not None else "." not in entry.name
            if is_dir:
                if not sub and entry.name not in SKIPPED_DIRS:
                    out += Copier._files(target, set_path, name)
                continue
            out.append(name)
        return sorted(out)

    def copy_set_files(self, s: SourceSet, have: set[str], outcome: CopiedSet) -> None:
        """Every file the destination lacks, manifest.json last (re-read and authenticated right here)."""
        files = [f for f in self.src_files(s.path) if f != "manifest.json" and f not in have]

        def one(rel: str) -> int:
            try:
                blob = self.src.target.read_bytes(f"{s.path}/{rel}", set_file_max(rel))
            except FileNotFoundError:
                raise BackupSetError(
                    f"{rel} of {s.kind} set {s.vm}/{s.backup_id} vanished from '{self.src.target.name}' "
                    "while copying (pruned?)", "rerun the copy",
                ) from None
            return self.send(f"{s.path}/{rel}", blob)

        with ThreadPoolExecutor(self.workers) as pool:
            sent = list(pool.map(one, files))
        path = f"{s.path}/manifest.json"
        blob = self.src.target.read_bytes(path, MANIFEST_MAX)
        self.src.open_blob(path, blob, f"manifest of {s.kind} set {s.vm}/{s.backup_id}")  # authentic
        sent.append(self.send(path, blob))
        outcome.files_sent, outcome.bytes_sent = len(sent), sum(sent)
        self.report.files_sent += len(sent)

    def copy_documents(self) -> None:
        for folder in DOCUMENT_DIRS:
            theirs = {e.name: e.size for e in self.dst.scan(folder)}
            for entry in self.src.target.scan(folder):
                if entry.is_dir or TMP_MARK in entry.name:
                    continue
                if entry.name in theirs and (entry.size is None or theirs[entry.name] in (None, entry.size)):
                    continue
                path = f"{folder}/{entry.name}"
                self.send(path, self.src.target.read_bytes(path, DOCUMENT_MAX))
                self.report.documents_sent += 1
                self.report.files_sent += 1


def verify_blob(repo: Repository, digest: str, blob: bytes, max_size: int) -> None:
    """A chunk as stored is what its name says: authentic (encrypted), a zstd frame, and hashing to its
    name. ChecksumMismatch otherwise: a damaged chunk is never copied (the copy would hide the damage)."""
    path = Repository.chunk_path(digest)
    where = f"chunk {digest[:16]}… on target '{repo.target.name}'"
    frame = repo.open_blob(path, blob, where)
    try:
        data = decompress_bounded(frame, max_size)
    except zstandard.ZstdError:
        data = b""
    if repo.chunk_id(data) != digest:
        raise ChecksumMismatch(
            f"{where} does not match its checksum: not copied",
            f"run 'hotvm check --read-data --target {repo.target.name}' and restore from another copy",
        )


def _keep_filter(sets: list[SourceSet], dst_repo: Repository, keep: Keep, now: dt.datetime) -> dict[str, str]:
    """Image sets the destination's own retention would not keep: path -> why (they are not copied, so a
    set pruned from the copy does not come back)."""
    from hotvm.prune import list_sets

    points = [BackupPoint(s.vm, s.backup_id, SetState.COMPLETE, s.completed_at, path=s.path)
              for s in sets if s.kind == "image"]
    ours = {p.path for p in points}
    for listing in list_sets(dst_repo):
        if listing.manifest is not None and listing.point.path not in ours:
            points.append(listing.point)
    return {d.point.path: "; ".join(d.reasons) for d in retention.decide(points, keep, now)
            if not d.keep and d.point.path in ours}


def copy_repository(
    src: Repository,
    dst: Target,
    *,
    vms: Iterable[str] | None = None,
    keep: Keep | None = None,
    workers: int = DEFAULT_WORKERS,
    now: dt.datetime | None = None,
) -> CopyReport:
    """Copy every complete set of `src` that `dst` lacks (see the module docstring). `keep`: the
    destination's retention (only image sets it would keep are copied). Safe to rerun at any point."""
    started = time.monotonic()
    now = retention.aware(now or utcnow())
    copier = Copier(src, dst, workers)
    report = copier.report
    copier.match_repository()
    dst_repo = Repository(dst, src.key)  # the same key opens both locations of the repository
    sets = source_sets(src, vms)
    have = copier.present_sets(sets)
    todo: list[SourceSet] = []
    dropped = _keep_filter(sets, dst_repo, keep, now) if keep is not None else {}
    for s in sets:
        outcome = CopiedSet(kind=s.kind, vm=s.vm, backup_id=s.backup_id, action="copied")
        if "manifest.json" in have[s.path]:
            outcome.action = "present"
        elif s.path in dropped:
            outcome.action = "skipped"
            outcome.reason = f"the destination's keep: would not keep it ({dropped[s.path]})"
        else:
            todo.append(s)
        report.sets.append(outcome)
    outcomes = {(o.kind, o.vm, o.backup_id): o for o in report.sets}
    image_sets = [(s.vm, s.backup_id) for s in todo if s.kind == "image"]
    # A hold keeps the source's prune off these sets while they are copied (an immutable source cannot
    # take one: the hold file would be locked too; its sets cannot be pruned while locked anyway).
    holding = image_sets and not immutability.locking(src.target)
    with src.hold(f"copy to target '{dst.name}'", image_sets) if holding else nullcontext():
        refs: dict[str, int] = {}
        for s in todo:
            for digest, size in s.refs.items():
                refs[digest] = max(refs.get(digest, 0), size)
        report.chunks_referenced = len(refs)
        present = copier.dst_chunks(refs)
        report.chunks_present = len(present)
        missing = sorted(set(refs) - present)
        with ThreadPoolExecutor(workers) as pool:
            for size in pool.map(lambda d: copier.copy_chunk(d, refs[d]), missing):
                report.chunks_sent += 1
                report.chunk_bytes_sent += size
        if immutability.locking(dst):
            earlier = [f"{s.path}/{rel}" for s in todo for rel in have[s.path]]  # an interrupted run's
            report.locks_extended = immutability.protect_chunks(
                dst, [*map(Repository.chunk_path, present), *earlier])
            report.immutable_until = dst.lock_until(now)  # type: ignore[attr-defined]
        for s in todo:
            copier.copy_set_files(s, have[s.path], outcomes[(s.kind, s.vm, s.backup_id)])
    copier.copy_documents()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _destination_opens_it(src_target: Target, src_cfg: TargetConfig, dst_cfg: TargetConfig) -> None:
    """The copy must be readable with the destination's own configuration (the same key as the source,
    or none for a plain repository): checked against the source's marker before anything is written."""
    from hotvm import credentials

    try:
        Repository(src_target, credentials.encryption_key(dst_cfg)).unlock()
    except TargetConfigError as exc:
        raise TargetConfigError(
            f"target '{dst_cfg.name}' could not read a copy of '{src_cfg.name}' with its configuration "
            f"({exc.message})",
            "give the destination the same encryption_key_env/encryption_key_secret as the source (or none "
            "for an unencrypted repository)",
        ) from None


def copy_between(
    config: Config | str | Path | None,
    source: str | None,
    destination: str,
    vms: Iterable[str] | None = None,
    workers: int = DEFAULT_WORKERS,
) -> CopyReport:
    """`hotvm copy --from SOURCE --to DESTINATION`: open both targets from hotvm.yaml and copy. The
    destination's retention applies only if it has its own `keep:`."""
    from hotvm.formats.opener import open_repository

    cfg = load_config(config)
    src_cfg, dst_cfg = cfg.find_target(source), cfg.find_target(destination)
    if src_cfg.name == dst_cfg.name:
        raise ConfigError(f"copy from target '{src_cfg.name}' to itself", "give another target with --to")
    keep = dst_cfg.keep if "keep" in dst_cfg.model_fields_set else None
    with open_repository(src_cfg) as src, open_repository(dst_cfg, key=src.key) as dst:
        if read_marker(dst.target) in (None, read_marker(src.target)):  # else: refused as another one
            _destination_opens_it(src.target, src_cfg, dst_cfg)
        return copy_repository(src, dst.target, vms=vms, keep=keep, workers=workers)

"""`hotvm check`: is every backup set on a target restorable? (like `restic check`, PBS verify)

Always: every manifest parses; every disk's chunk list matches the disk's digest; every chunk a complete
set references, and its config archive, exist on the target. With `read_data`: every referenced chunk is
also read once (however many sets share it), authenticated (encrypted repository), decompressed and
hashed, and its id (the repository's chunk_hash: BLAKE3, sha256, or keyed) compared with its name; each
config archive with its checksum. Damage on the target (bit rot, a truncated or replaced
file, a chunk removed by hand) then shows before a restore needs that set.

Problems are collected per set; one problem never stops the check. Incomplete sets are listed, not
checked (they are never restored).
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import zstandard
from pydantic import BaseModel

from hotvm import immutability
from hotvm.errors import ChecksumMismatch, HotvmError
from hotvm.formats.bounds import CONFIG_ARCHIVE_MAX, chunk_max
from hotvm.formats.export import chunk_count, chunk_digest, decompress_bounded, image_digest
from hotvm.formats.repository import Repository
from hotvm.prune import TMP_MARK, SetListing, list_sets, repository_present
from hotvm.retention import SetState

ProblemKind = Literal[
    "repository",
    "manifest_unreadable",
    "disk_digest",
    "chunk_missing",
    "chunk_corrupt",
    "chunk_unreadable",
    "config_missing",
    "config_corrupt",
    "entries_missing",
    "geometry",
]
FILE_CHUNK_MAX = 8 << 20
"""A file set's chunk: a pack (4 MiB plus one last file under 1 MiB) or a 4 MiB piece of a large file."""
EXAMPLES = 3


class Problem(BaseModel):
    kind: ProblemKind
    detail: str


class SetCheck(BaseModel):
    vm: str
    backup_id: str
    state: SetState
    kind: Literal["image", "files"] = "image"
    disks: int = 0
    chunks: int = 0
    """Chunk references of the set (a chunk used twice counts twice)."""
    problems: list[Problem] = []
    warnings: list[str] = []
    """Not problems: e.g. a set written by a hotvm without manifest checksums (legacy)."""
    retained_until: dt.datetime | None = None
    """S3 Object Lock: until when the set cannot be deleted (its manifest's lock; None: no lock)."""

    @property
    def ok(self) -> bool:
        return not self.problems


class CheckReport(BaseModel):
    target: str
    url: str
    vm: str | None = None
    read_data: bool
    sets: list[SetCheck] = []
    problems: list[Problem] = []
    """Problems of the repository itself (not of one set)."""
    chunks_present: int = 0
    chunks_referenced: int = 0
    """Distinct chunks the checked sets reference."""
    chunks_unreferenced: int | None = None
    """Present but referenced by no set (prune removes them); only counted when every VM is checked."""
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def problem_count(self) -> int:
        return len(self.problems) + sum(len(s.problems) for s in self.sets)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def summary(self) -> dict:
        return {**self.model_dump(mode="json"), "ok": self.ok, "problem_count": self.problem_count}


def _examples(items: list[tuple[int, str]]) -> str:
    shown = ", ".join(f"chunk {i} {d[:16]}…" for i, d in items[:EXAMPLES])
    return shown + (", …" if len(items) > EXAMPLES else "")


def _verify_chunk(repo: Repository, digest: str, max_size: int) -> tuple[str | None, int, int]:
    """(what is wrong or None, bytes read, plain length)."""
    wrong, nbytes, data = _read_chunk(repo, digest, max_size)
    return wrong, nbytes, len(data)


def _read_chunk(repo: Repository, digest: str, max_size: int) -> tuple[str | None, int, bytes]:
    path = repo.chunk_path(digest)
    try:
        blob = repo.target.read_bytes(path, chunk_max(max_size))
    except FileNotFoundError:
        return "vanished while checking", 0, b""
    except HotvmError as exc:
        return f"unreadable: {exc.message}", 0, b""
    try:
        frame = repo.open_blob(path, blob, "chunk")
    except ChecksumMismatch:
        return "fails authentication (encrypted chunk damaged or tampered with)", len(blob), b""
    try:
        data = decompress_bounded(frame, max_size)
    except zstandard.ZstdError as exc:
        return f"not a valid zstd frame ({exc})", len(blob), b""
    if repo.chunk_id(data) != digest:
        return f"content does not match its {repo.chunk_hash}", len(blob), b""
    return None, len(blob), data


def _check_set(listing: SetListing, store: set[str], check: SetCheck) -> None:
    manifest = listing.manifest
    assert manifest is not None
    if manifest.checksum is None:
        check.warnings.append(
            f"legacy set (manifest format {manifest.format_version}): written by a hotvm without manifest "
            "checksums, so bit rot in its manifest is caught only by the geometry checks"
        )
    check.disks = len(manifest.disks)
    for disk in manifest.disks:
        check.chunks += len(disk.chunks)
        if image_digest(disk.chunks, chunk_count(disk.virtual_size, disk.chunk_size)) != disk.digest:
            what = f"disk '{disk.device}': chunk list does not match its digest"
            check.problems.append(Problem(kind="disk_digest", detail=what))
        missing = [(i, d) for i, d, _ in disk.refs() if d not in store]
        if missing:
            check.problems.append(
                Problem(
                    kind="chunk_missing",
                    detail=f"disk '{disk.device}': {len(missing)} of {len(disk.chunks)} chunk(s) missing "
                    f"({_examples(missing)})",
                )
            )
    archive = manifest.config_archive
    if archive and archive.name not in {f.name for f in listing.files}:
        check.problems.append(Problem(kind="config_missing", detail=f"{archive.name} is missing"))


def _check_config(repo: Repository, listing: SetListing, check: SetCheck) -> int:
    manifest = listing.manifest
    assert manifest is not None and manifest.config_archive is not None
    archive = manifest.config_archive
    path = f"{listing.point.path}/{archive.name}"
    try:
        blob = repo.target.read_bytes(path, CONFIG_ARCHIVE_MAX)
    except FileNotFoundError:
        return 0  # already reported as missing
    try:
        plain = repo.open_blob(path, blob, archive.name)
    except ChecksumMismatch:
        what = f"{archive.name} fails authentication (damaged or tampered with)"
        check.problems.append(Problem(kind="config_corrupt", detail=what))
        return len(blob)
    if chunk_digest(plain) != archive.sha256:
        what = f"{archive.name} does not match its sha256"
        check.problems.append(Problem(kind="config_corrupt", detail=what))
    return len(blob)


def _attribute(listing: SetListing, bad: dict[str, str], lengths: dict[str, int], check: SetCheck) -> None:
    """One problem per disk and kind for the damaged chunks this set uses, and for intact chunks whose
    length is not what the disk's geometry gives their index (a rotted chunk_size or virtual_size)."""
    assert listing.manifest is not None
    for disk in listing.manifest.disks:
        misfit = [(i, d, n) for i, d, n in disk.refs() if d in lengths and lengths[d] != n]
        if misfit:
            i, d, n = misfit[0]
            detail = (
                f"disk '{disk.device}': {len(misfit)} chunk(s) do not fit chunk_size {disk.chunk_size} / "
                f"virtual_size {disk.virtual_size} or their patch entry (chunk {i} holds {lengths[d]} bytes, "
                f"expected {n}): the manifest is damaged"
            )
            check.problems.append(Problem(kind="geometry", detail=detail))
        hits = [(i, d) for i, d, _ in disk.refs() if d in bad]
        unreadable = [(i, d) for i, d in hits if bad[d].startswith(("unreadable", "vanished"))]
        corrupt = [(i, d) for i, d in hits if not bad[d].startswith(("unreadable", "vanished"))]
        for kind, group, what in (
            ("chunk_corrupt", corrupt, "damaged (authentication, decompression or hash failed)"),
            ("chunk_unreadable", unreadable, "unreadable"),
        ):
            if group:
                detail = f"disk '{disk.device}': {len(group)} chunk(s) {what} ({_examples(group)})"
                if kind == "chunk_unreadable":
                    detail += f"; the first: {bad[group[0][1]]}"
                check.problems.append(Problem(kind=kind, detail=detail))


def _check_file_sets(
    repo: Repository, vm: str | None, store: set[str], max_size: dict[str, int], report: CheckReport
) -> list[tuple[SetCheck, set[str]]]:
    """Daily file sets (files/...): manifest readable, entry lists present, every chunk in the store."""
    from hotvm.prune import list_file_sets

    checked = []
    for listing in list_file_sets(repo):
        p = listing.point
        if vm is not None and p.vm != vm:
            continue
        check = SetCheck(vm=p.vm, backup_id=p.backup_id, state=p.state, kind="files",
                         retained_until=immutability.set_retained_until(repo.target, p.path))
        report.sets.append(check)
        if p.state is SetState.DAMAGED:
            check.problems.append(Problem(kind="manifest_unreadable", detail="file set manifest unreadable"))
            continue
        if listing.manifest is None:
            continue
        refs = listing.manifest.chunks()
        check.disks, check.chunks = len(listing.manifest.volumes), len(refs)
        names = {e.name for e in repo.target.scan(f"{p.path}/volumes")}
        for volume in listing.manifest.volumes:
            if volume.entries not in names:
                what = f"entry list of {volume.key} is missing"
                check.problems.append(Problem(kind="entries_missing", detail=what))
        missing = sorted(refs - store)
        if missing:
            what = f"{len(missing)} of {len(refs)} chunk(s) of file contents missing ({missing[0][:16]}…)"
            check.problems.append(Problem(kind="chunk_missing", detail=what))
        for digest in refs:
            max_size[digest] = max(max_size.get(digest, 0), FILE_CHUNK_MAX)
        checked.append((check, refs))
    return checked


def check_repository(
    repo: Repository, *, read_data: bool = False, vm: str | None = None, workers: int = 4
) -> CheckReport:
    started = time.monotonic()
    target = repo.target
    report = CheckReport(target=target.name, url=target.display(), vm=vm, read_data=read_data)
    if not repository_present(repo):
        report.problems.append(
            Problem(kind="repository", detail=f"no hotvm repository at {target.display()}")
        )
        return report
    store = {
        e.name
        for prefix in target.scan("chunks")
        if prefix.is_dir is not False
        for e in target.scan(f"chunks/{prefix.name}")
        if TMP_MARK not in e.name
    }
    report.chunks_present = len(store)
    listings = list_sets(repo, vm)
    max_size: dict[str, int] = {}
    """Every distinct chunk referenced, with the largest chunk size it is used at."""
    for listing in listings:
        p = listing.point
        check = SetCheck(vm=p.vm, backup_id=p.backup_id, state=p.state)
        report.sets.append(check)
        if p.state is SetState.DAMAGED:
            check.problems.append(Problem(kind="manifest_unreadable", detail=listing.problem or "unreadable"))
            continue
        if listing.manifest is None:
            continue
        _check_set(listing, store, check)
        for disk in listing.manifest.disks:
            for digest in disk.digests():
                max_size[digest] = max(max_size.get(digest, 0), disk.chunk_size)
    file_sets = _check_file_sets(repo, vm, store, max_size, report)
    report.chunks_referenced = len(max_size)
    if vm is None:
        report.chunks_unreferenced = len(store - max_size.keys())
    if read_data:
        to_read = sorted(d for d in max_size if d in store)
        bad: dict[str, str] = {}
        lengths: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda d: _verify_chunk(repo, d, max_size[d]), to_read)
            for digest, (wrong, nbytes, length) in zip(to_read, results, strict=True):
                report.chunks_read += 1
                report.bytes_read += nbytes
                if wrong:
                    bad[digest] = wrong
                else:
                    lengths[digest] = length
        for check, refs in file_sets:
            damaged = sorted(d for d in refs if d in bad)
            if damaged:
                detail = f"{len(damaged)} chunk(s) of file contents damaged/unreadable ({damaged[0][:16]}…)"
                check.problems.append(Problem(kind="chunk_corrupt", detail=detail))
        for listing, check in zip(listings, report.sets[: len(listings)], strict=True):
            if listing.manifest is None:
                continue
            _attribute(listing, bad, lengths, check)
            if listing.manifest.config_archive is not None:
                report.bytes_read += _check_config(repo, listing, check)
    if immutability.locking(target):
        for listing, check in zip(listings, report.sets[: len(listings)], strict=True):
            check.retained_until = immutability.set_retained_until(target, listing.point.path)
    report.seconds = round(time.monotonic() - started, 3)
    return report

"""Back up one guest file system: walk it, read only new or changed files, store their contents.

Small files are packed together into ~4 MiB pack chunks (one stored object per pack, not per file: 100k
small files would otherwise be 100k fsync'd writes); a file's content is then (pack, offset, length).
Larger files are split into 4 MiB chunks. Each file's content id is the repository's chunk id of its bytes
(of its chunk list for large files), so identical contents are stored once, within a run and against the
previous set (renames and copies cost nothing). A file whose size, mtime and inode are unchanged since the
previous set is not read at all: its content reference is reused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from hotvm.errors import HotvmError
from hotvm.files.filesets import VolumeStats
from hotvm.formats.export import compress_chunk
from hotvm.formats.repository import Repository

CHUNK = 4 * 1024 * 1024
PACK_TARGET = 4 * 1024 * 1024
SMALL_FILE = 1024 * 1024
"""Files below this size go into packs; larger ones get chunks of their own."""
UPLOADERS = 2

Piece = list  # [chunk digest, offset, length]; the digest of a pack is filled in when the pack is stored


def norm_path(path: str) -> str:
    """Volume-relative paths always as '/a/b' (whatever the reader yields)."""
    return "/" + path.strip("/")


@dataclass
class _Counts:
    """VolumeStats as plain attributes: counted per file, so no validation on every increment."""

    files_seen: int = 0
    dirs_seen: int = 0
    other_seen: int = 0
    files_read: int = 0
    files_stored: int = 0
    bytes_seen: int = 0
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_unchanged: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0
    files_unreadable: int = 0
    unreadable: list[str] = field(default_factory=list)


@dataclass
class _Store:
    """Packs small contents and uploads chunks on a small pool, off the reading thread."""

    repo: Repository
    stats: _Counts
    pool: ThreadPoolExecutor
    buffer: bytearray = field(default_factory=bytearray)
    pending: list[Piece] = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)
    chunks: set[str] = field(default_factory=set)

    def add_small(self, data: bytes) -> list[Piece]:
        piece: Piece = [None, len(self.buffer), len(data)]
        self.buffer += data
        self.pending.append(piece)
        if len(self.buffer) >= PACK_TARGET:
            self.flush()
        return [piece]

    def flush(self) -> None:
        if not self.buffer:
            return
        data, pieces = bytes(self.buffer), self.pending
        self.buffer, self.pending = bytearray(), []
        digest = self.put(data)
        for piece in pieces:
            piece[0] = digest

    def put(self, data: bytes) -> str:
        """Store one chunk (once per run, and only if the store lacks it); returns its id."""
        digest = self.repo.chunk_id(data)
        self.chunks.add(digest)
        if digest not in self.claimed:
            self.claimed.add(digest)
            self.futures.append(self.pool.submit(self._upload, digest, data))
            if len(self.futures) > 2 * UPLOADERS:
                self._drain(UPLOADERS)
        return digest

    def _upload(self, digest: str, data: bytes) -> int:
        if self.repo.has_chunk(digest, for_write=True):
            return 0
        return self.repo.put_chunk(digest, compress_chunk(data))

    def _drain(self, keep: int = 0) -> None:
        while len(self.futures) > keep:
            self.stats.bytes_stored += self.futures.pop(0).result()

    def finish(self) -> None:
        self.flush()
        self._drain()


@dataclass
class ScanResult:
    entries: list[dict]
    chunks: list[str]
    stats: VolumeStats


def entry_dict(item, path: str | None = None) -> dict:  # noqa: ANN001 - hotvm.files.fs.FileEntry
    """One entry of a set's entry list (content fields filled in by the scan)."""
    return {
        "path": path or norm_path(item.path), "kind": item.kind,
        "size": item.size if item.kind == "file" else 0,
        "mode": item.mode, "uid": item.uid, "gid": item.gid, "mtime_ns": item.mtime_ns,
        "atime_ns": item.atime_ns, "ctime_ns": item.ctime_ns, "inode": item.inode, "nlink": item.nlink,
        "target": item.target, "link": None, "content": None, "pieces": None,
    }  # fmt: skip


def content_index(entries: Iterable[dict]) -> dict[str, list[Piece]]:
    """content id -> pieces, from an earlier set's entries (for dedup against it)."""
    return {e["content"]: e["pieces"] for e in entries if e.get("content") and e.get("pieces") is not None}


def scan_volume(
    repo: Repository,
    fs,  # noqa: ANN001 - hotvm.files.fs.Filesystem
    previous: list[dict] | None = None,
    known: dict[str, list[Piece]] | None = None,
    progress: Callable[[_Counts], None] | None = None,
) -> ScanResult:
    """Walk `fs` (parents first) and store what the target does not hold yet.

    `previous`: the same volume's entries in the previous complete set (unchanged files are not read);
    `known`: content id -> pieces of contents already stored (dedup), extended as files are stored."""
    started = time.monotonic()
    stats = _Counts()
    before = {e["path"]: e for e in previous or () if e["kind"] == "file"}
    known = known if known is not None else {}
    if previous:
        known.update(content_index(previous))
    links: dict[int, dict] = {}
    entries: list[dict] = []
    with ThreadPoolExecutor(UPLOADERS, thread_name_prefix="hotvm-files-put") as pool:
        store = _Store(repo, stats, pool)
        for item in fs.walk():
            path = norm_path(item.path)
            if path == "/":
                continue
            entry = entry_dict(item, path)
            entries.append(entry)
            if item.kind == "dir":
                stats.dirs_seen += 1
                continue
            if item.kind != "file":
                stats.other_seen += 1
                continue
            stats.files_seen += 1
            stats.bytes_seen += entry["size"]
            if item.nlink > 1 and item.inode in links:  # a hard link to a file already seen in this walk
                first = links[item.inode]
                entry.update(link=first["path"], content=first["content"], pieces=first["pieces"])
                continue
            if item.nlink > 1:
                links[item.inode] = entry
            old = before.get(path)
            if (
                old is not None and old.get("pieces") is not None
                and (old["size"], old["mtime_ns"], old["inode"]) == (entry["size"], item.mtime_ns, item.inode)
            ):  # fmt: skip
                entry.update(content=old["content"], pieces=old["pieces"])
                stats.bytes_unchanged += entry["size"]
                store.chunks.update(p[0] for p in old["pieces"])
                continue
            try:
                _read_and_store(fs, item, entry, store, known, stats)
            except HotvmError as exc:  # FilesystemUnreadable of one file: the others still back up
                entry.update(content=None, pieces=None, error=exc.message)
                stats.files_unreadable += 1
                if len(stats.unreadable) < 20:
                    stats.unreadable.append(exc.message)
            if progress is not None and stats.files_read % 1000 == 0:
                progress(stats)
        store.finish()
    for refused in getattr(fs, "refused", ()):  # forged names: reported, never stored
        stats.files_unreadable += 1
        if len(stats.unreadable) < 20:
            stats.unreadable.append(refused)
    chunks = {p[0] for e in entries if e["pieces"] for p in e["pieces"]}
    stats.seconds = round(time.monotonic() - started, 3)
    return ScanResult(entries, sorted(chunks), VolumeStats(**dataclasses.asdict(stats)))


def _read_and_store(fs, item, entry: dict, store: _Store, known: dict, stats: _Counts) -> None:  # noqa: ANN001
    stats.files_read += 1
    repo = store.repo
    if item.size < SMALL_FILE:
        data = b"".join(fs.read(item, CHUNK))
        stats.bytes_read += len(data)
        entry["size"] = len(data)
        content = repo.chunk_id(data)
        if content in known:
            pieces = known[content]
            stats.bytes_unchanged += len(data)
        else:
            pieces = store.add_small(data) if data else []
            known[content] = pieces
            stats.files_stored += 1
            stats.bytes_new += len(data)
        entry.update(content=content, pieces=pieces)
        return
    pieces, buf, new, size = [], bytearray(), 0, 0
    for block in fs.read(item, CHUNK):
        buf += block
        while len(buf) >= CHUNK:
            part, buf = bytes(buf[:CHUNK]), buf[CHUNK:]
            new += _large_piece(store, part, pieces)
            size += len(part)
    if buf:
        new += _large_piece(store, bytes(buf), pieces)
        size += len(buf)
    stats.bytes_read += size
    entry["size"] = size
    content = repo.chunk_id(("large:" + ",".join(p[0] for p in pieces)).encode())
    known.setdefault(content, pieces)
    stats.bytes_new += new
    stats.bytes_unchanged += size - new
    if new:
        stats.files_stored += 1
    entry.update(content=content, pieces=pieces)


def _large_piece(store: _Store, data: bytes, pieces: list) -> int:
    """Append the chunk of `data`; returns its size if it is new to this run and the store."""
    digest = store.repo.chunk_id(data)
    fresh = digest not in store.claimed and not store.repo.has_chunk(digest)
    store.put(data)
    pieces.append([digest, 0, len(data)])
    return len(data) if fresh else 0

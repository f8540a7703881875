"""The disks of one backup set as byte ranges, assembled from verified chunks: what the NBD export serves.

Runs inside the nbdkit Python plugin (Debian's python3), so it needs no Repository, no configuration and
no secret lookup: the parent hands it a Target configuration, the credentials that target needs and, for
an encrypted repository, the derived data and chunk-id keys (never the passphrase), through a pipe.

Every chunk goes through `verify_chunk` (authenticated, decompressed, checked against its name) before a
byte of it is served; a chunk that fails is never served, the read fails with EIO, and the chunk is named
in `problems.jsonl` for hotvm to report. Each chunk is fetched from the target once while it stays in the
small in-memory cache (the stream reads a chunk in pieces, in order, and read-ahead fills the next ones);
remote targets also keep the fetched (still encrypted) blobs in a bounded local cache directory, so a chunk
a guest already pulled is not downloaded again by the stream.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import datetime as dt
import json
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hotvm.errors import ChecksumMismatch, HotvmError, TargetConfigError, TargetError
from hotvm.formats.bounds import chunk_max
from hotvm.formats.manifest import DiskRecord, Piece
from hotvm.formats.repository import Repository
from hotvm.formats.restore import compose, verify_chunk
from targets.base import Target, is_unreachable

MEMORY_CHUNKS = 16
"""Plain chunks kept in memory (4 MiB each by default): the stream's current one plus the read-ahead."""
READ_AHEAD = 4
"""Chunks fetched ahead of a sequential reader (the stream), so fetch, decompress and hash overlap QEMU's
writes into the overlay."""


@dataclass
class Disk:
    record: DiskRecord
    digests: dict[int, str] = field(default_factory=dict)
    """Per non-zero index: its chunk's name, or (a chunk with patches, format 3) a key of its composition."""
    patched: dict[int, Piece] = field(default_factory=dict)
    present: list[int] = field(default_factory=list)
    """Indexes of the non-zero chunks, in order: read-ahead skips the holes the stream skips."""

    @classmethod
    def of(cls, record: DiskRecord) -> Disk:
        digests, patched = {}, {}
        for piece in record.pieces():
            if piece.patches:
                patched[piece.index] = piece
                digests[piece.index] = "patched:" + repr((piece.base, piece.patches))
            else:
                digests[piece.index] = piece.base
        return cls(record, digests, patched=patched, present=sorted(digests))


class BlobCache:
    """Fetched chunk files of a remote target, as stored there (an encrypted repository's stay encrypted),
    under a private directory, evicted oldest first beyond `limit` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        for entry in sorted(path.iterdir(), key=lambda p: p.stat().st_mtime):
            if entry.is_file() and not entry.name.endswith(".tmp"):
                self._sizes[entry.name] = entry.stat().st_size

    def get(self, digest: str) -> bytes | None:
        try:
            return (self.path / digest).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, digest: str, blob: bytes) -> None:
        if len(blob) > self.limit:
            return
        tmp = self.path / f"{digest}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, self.path / digest)
        with self._lock:
            self._sizes[digest] = len(blob)
            while sum(self._sizes.values()) > self.limit:
                old, _ = self._sizes.popitem(last=False)
                (self.path / old).unlink(missing_ok=True)


class ChunkSource:
    """Reads of a set's disks, chunk by verified chunk."""

    def __init__(
        self,
        target: Target,
        sealer: object | None,
        disks: dict[str, DiskRecord],
        *,
        cache: BlobCache | None = None,
        unreachable_wait_s: float = 60.0,
        log_dir: Path | None = None,
        read_ahead: int = READ_AHEAD,
        chunk_hash: str = "sha256",
    ) -> None:
        """`chunk_hash`: the repository's chunk id scheme (an unencrypted one's; a sealer knows its own)."""
        from hotvm.formats.chunkid import id_function

        self.target, self.sealer, self.cache = target, sealer, cache
        self._plain_id = id_function(chunk_hash) if sealer is None else None
        self.disks = {name: Disk.of(record) for name, record in disks.items()}
        self.unreachable_wait_s = unreachable_wait_s
        self.log_dir = log_dir
        self.read_ahead = read_ahead
        self._plain: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._damaged: dict[str, ChecksumMismatch] = {}
        """Objects that failed verification: every later read of them fails at once, not after fetching and
        hashing the same bad chunk again for each 4 KiB the guest retries."""
        self._pool: ThreadPoolExecutor | None = None

    # ---- what verify_chunk needs of a repository
    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        """The repository's own chunk id (the bundle says which scheme; a sealer knows its keyed one)."""
        return self.sealer.chunk_id(data) if self.sealer else self._plain_id(data)  # type: ignore[attr-defined]

    def get_chunk(self, digest: str, plain: int) -> bytes:
        """The chunk's zstd frame, authenticated: from the local cache, else from the target (waiting up to
        `unreachable_wait_s` while the target cannot be reached), at most bounds.chunk_max(plain) bytes
        (`plain`: its disk's chunk_size)."""
        path = Repository.chunk_path(digest)
        blob = self.cache.get(digest) if self.cache else None
        if blob is None:
            blob = self._fetch(path, digest, chunk_max(plain))
            if self.cache:
                self.cache.put(digest, blob)
        if self.sealer is None:
            return blob
        return self.sealer.open(path, blob, f"chunk {digest[:16]}… on target '{self.target.name}'")  # type: ignore[attr-defined]

    def _fetch(self, path: str, digest: str, limit: int) -> bytes:
        deadline = time.monotonic() + self.unreachable_wait_s
        delay = 0.5
        while True:
            try:
                blob = self.target.read_bytes(path, limit)
                self._log("fetches.log", digest)
                return blob
            except FileNotFoundError:
                raise ChecksumMismatch(
                    f"chunk {digest[:16]}… is missing from target '{self.target.name}'",
                    "the repository is damaged; restore another backup",
                ) from None
            except (TargetError, OSError) as exc:
                retry = is_unreachable(exc) or (
                    isinstance(exc, TargetError) and not isinstance(exc, TargetConfigError)
                )
                if not retry or time.monotonic() > deadline:
                    raise
                self._log("problems.jsonl", json.dumps({"unreachable": str(exc)[:300]}))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---- plain chunks
    def _verified(self, disk: Disk, index: int, digest: str) -> bytes:
        """The plain bytes of chunk `index` (`digest`: its key in disk.digests), composed from its base and
        patches if it has patches (each verified on its own)."""
        piece = disk.patched.get(index)
        if piece is None:
            return self._object(disk, index, digest)
        with self._lock:
            data = self._plain.get(digest)
            if data is not None:
                self._plain.move_to_end(digest)
                return data
        data = compose(disk.record, piece, lambda name, length: self._object(disk, index, name, length))
        with self._lock:
            self._plain[digest] = data
            while len(self._plain) > MEMORY_CHUNKS:
                self._plain.popitem(last=False)
        return data

    def _object(self, disk: Disk, index: int, digest: str, length: int | None = None) -> bytes:
        """The plain bytes of a stored object (a chunk, or a patch of `length` bytes), fetched and verified
        once however many readers want it."""
        while True:
            with self._lock:
                if digest in self._damaged:
                    raise copy.copy(self._damaged[digest])
                data = self._plain.get(digest)
                if data is not None:
                    self._plain.move_to_end(digest)
                    return data
                waiting = self._inflight.get(digest)
                if waiting is None:
                    self._inflight[digest] = threading.Event()
                    break
            waiting.wait()
        try:
            size = disk.record.chunk_size
            fetch = lambda: self.get_chunk(digest, size)  # noqa: E731
            data = verify_chunk(self, disk.record, index, digest, fetch, length)  # type: ignore[arg-type]
        except HotvmError as exc:
            self._log("problems.jsonl", json.dumps({"device": disk.record.device, "index": index,
                                                    "chunk": digest, "error": exc.message}))
            if isinstance(exc, ChecksumMismatch):  # damaged for good; an unreachable target may come back
                with self._lock:
                    self._damaged[digest] = exc
            raise
        finally:
            with self._lock:
                event = self._inflight.pop(digest)
            event.set()
        with self._lock:
            self._plain[digest] = data
            while len(self._plain) > MEMORY_CHUNKS:
                self._plain.popitem(last=False)
        return data

    def _read_ahead(self, disk: Disk, index: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readahead")
        start = bisect.bisect_right(disk.present, index)
        for ahead in disk.present[start : start + self.read_ahead]:
            digest = disk.digests[ahead]
            with self._lock:
                if digest in self._plain or digest in self._inflight:
                    continue
            self._pool.submit(self._quiet_verified, disk, ahead, digest)

    def _quiet_verified(self, disk: Disk, index: int, digest: str) -> None:
        with contextlib.suppress(Exception):  # read-ahead only: the real read reports it
            self._verified(disk, index, digest)

    # ---- the export
    def size(self, device: str) -> int:
        return self.disks[device].record.virtual_size

    def read(self, device: str, offset: int, length: int) -> bytes | memoryview:
        """`length` bytes at `offset` of the disk; raises (never returns wrong data) if a chunk fails."""
        disk = self.disks[device]
        size = disk.record.chunk_size
        index, start = divmod(offset, size)
        digest = disk.digests.get(index)
        if start + length <= size and digest is not None:  # the stream's case: a piece of one chunk
            data = self._verified(disk, index, digest)
            self._read_ahead(disk, index)
            if start + length <= len(data):
                return memoryview(data)[start : start + length]
        out = bytearray(length)
        pos = offset
        while pos < offset + length:
            index, start = divmod(pos, size)
            n = min(size - start, offset + length - pos)
            digest = disk.digests.get(index)
            if digest is not None:
                data = self._verified(disk, index, digest)
                piece = data[start : start + n]
                out[pos - offset : pos - offset + len(piece)] = piece
                self._read_ahead(disk, index)
            pos += n
        return bytes(out)

    def extents(self, device: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs over the range, from the chunk list alone (absent = zero)."""
        disk = self.disks[device]
        size, runs = disk.record.chunk_size, []
        pos, end = offset, min(offset + length, disk.record.virtual_size)
        while pos < end:
            index = pos // size
            n = min((index + 1) * size, end) - pos
            zero = index not in disk.digests
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
            else:
                runs.append((pos, n, zero))
            pos += n
        return runs

    def _log(self, name: str, line: str) -> None:
        if self.log_dir is None:
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S.%f")
        with open(self.log_dir / name, "a") as fh:
            fh.write(line if name.endswith(".jsonl") else f"{stamp} {line}")
            fh.write("\n")


def open_source(bundle: dict, log_dir: Path | None) -> ChunkSource:
    """The ChunkSource described by the bundle the parent hotvm process wrote into the plugin's pipe."""
    from hotvm import credentials
    from hotvm.config import TargetConfig
    from targets import open_target

    credentials.hand_in(bundle.get("credentials", {}))
    target = open_target(TargetConfig.model_validate(bundle["target"]))
    sealer = None
    if bundle.get("keys"):
        from hotvm.formats.crypto import Keys, Sealer

        keys = bundle["keys"]
        sealer = Sealer(Keys(bytes.fromhex(keys["data"]), bytes.fromhex(keys["ids"]), b""),
                        str(bundle.get("chunk_hash", "hmac-sha256")))
    cache = None
    if bundle.get("cache_dir"):
        cache = BlobCache(Path(bundle["cache_dir"]), int(bundle.get("cache_bytes", 1 << 30)))
    disks = {d["export"]: DiskRecord.model_validate(d["record"]) for d in bundle["disks"]}
    return ChunkSource(
        target, sealer, disks, cache=cache,
        unreachable_wait_s=float(bundle.get("unreachable_wait_s", 60)), log_dir=log_dir,
        read_ahead=int(bundle.get("read_ahead", READ_AHEAD)),
        chunk_hash=str(bundle.get("chunk_hash", "sha256")),
    )  # fmt: skip

"""Restore disks and config files from a backup set, verifying every chunk on the way.

Each disk is written to `<dest>.partial` first (thin: zero chunks stay holes) and renamed only when every
chunk has arrived and matched its hash, so a failed restore never leaves a file that looks usable.
"""

from __future__ import annotations

import mmap
import os
import queue
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zstandard

from hotvm.allocator import tune_for_large_buffers
from hotvm.child_env import child_env
from hotvm.errors import ChecksumMismatch, HotvmError, TamperedBlob
from hotvm.formats.bounds import chunk_max
from hotvm.formats.configtar import unpack_config_archive
from hotvm.formats.directio import DirectWriter, aligned_buffer, pwrite_all
from hotvm.formats.export import chunk_digest, decompress_bounded, decompress_into
from hotvm.formats.manifest import DiskRecord, Manifest, Piece, Place
from hotvm.formats.repository import Repository, safe_name

DiskFormat = Literal["qcow2", "raw"]
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class RestoredDisk:
    device: str
    path: str
    format: str
    virtual_size: int
    bytes_written: int


def _place_checked(
    fd: int, record: DiskRecord, data: Buffer, where: Place, direct: DirectWriter | None = None
) -> int:
    """place(), after checking the object has the length this place needs (the short last chunk, or a
    patch, named like an object of another length)."""
    if len(data) != where.length:
        raise ChecksumMismatch(
            f"chunk {where.index} of disk '{record.device}' does not fit the disk's geometry",
            "the manifest is damaged; restore another backup",
        )
    return place(fd, data, where, direct)


def verify_chunk(
    repo: Repository,
    record: DiskRecord,
    index: int,
    digest: str,
    open_frame: Callable[[], Buffer],
    length: int | None = None,
    out: bytearray | mmap.mmap | None = None,
) -> Buffer:
    """The plain bytes of chunk `index` of a disk (or of a patch of it, `length` bytes): `open_frame` gives
    its zstd frame (read from a target, or a tape, and authenticated in an encrypted repository); it is
    decompressed (never beyond chunk_size) and checked against its name and against the length the disk's
    geometry (or the patch entry) gives it. With `out` (at least chunk_size bytes) it is decompressed into
    that buffer and returned as a view of it (valid until `out` is reused).
    ChecksumMismatch if anything does not match: such a chunk is never used as data."""
    try:
        frame = open_frame()
    except ChecksumMismatch as exc:
        hint = "the backup copy is damaged; restore another backup"
        if isinstance(exc, TamperedBlob):
            hint = exc.hint
        raise type(exc)(f"chunk {index} of disk '{record.device}': {exc.message}", hint) from None
    data: Buffer
    try:
        if out is None:
            data = decompress_bounded(frame, record.chunk_size)
        else:
            data = decompress_into(frame, memoryview(out)[: record.chunk_size])
    except zstandard.ZstdError:
        data = b""  # reported below as a mismatch
    if repo.chunk_id(data) != digest:
        raise ChecksumMismatch(
            f"chunk {index} of disk '{record.device}' does not match its checksum ({digest[:16]}…)",
            "the backup copy is damaged; restore another backup",
        )
    if length is not None and len(data) != length:
        raise ChecksumMismatch(
            f"patch of chunk {index} of disk '{record.device}' holds {len(data)} bytes where its entry says "
            f"{length}",
            "the manifest is damaged; restore another backup",
        )
    if length is None and len(data) != record.chunk_length(index):
        # The chunk is intact, so the disk's geometry (chunk_size, virtual_size) is what is wrong.
        raise ChecksumMismatch(
            f"chunk {index} of disk '{record.device}' holds {len(data)} bytes where the disk's geometry "
            f"(chunk_size {record.chunk_size}, virtual_size {record.virtual_size}) says "
            f"{record.chunk_length(index)}",
            "the manifest is damaged; restore another backup",
        )
    return data


def compose(record: DiskRecord, piece: Piece, fetch: Callable[[str, int | None], bytes]) -> bytes:
    """The plain bytes of chunk `piece.index`: its base (or zeros) with its patches laid over.
    `fetch(name, patch_length)` gives verified plain bytes (patch_length None: a whole chunk)."""
    if not piece.patches and piece.base is not None:
        return fetch(piece.base, None)
    out = bytearray(fetch(piece.base, None) if piece.base else bytes(record.chunk_length(piece.index)))
    for patch in piece.patches:
        out[patch.offset : patch.offset + patch.length] = fetch(patch.digest, patch.length)
    return bytes(out)


def place(fd: int, data: Buffer, where: Place, direct: DirectWriter | None = None) -> int:
    """Write an object's verified bytes where `where` says (holes stay holes); returns bytes placed."""
    view = memoryview(data)
    for lo, hi in where.spans:
        write_sparse(fd, view[lo:hi], where.at + lo, direct)
    return sum(hi - lo for lo, hi in where.spans)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes to disk now (on Linux, DONTNEED starts writeback of dirty pages and drops
    only clean ones): the disk works while later chunks are fetched and hashed, so the final fsync finds
    little left to do instead of all of the disk."""
    with suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


HOLE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(HOLE_BLOCK)


def _is_zero(block: memoryview) -> bool:
    """Whether a block is all zeros, at memcmp speed: a memoryview compares item by item (measured: 75 ms
    for 4 MiB of zeros, against a few for bytes), so only a block that starts with zeros is copied to
    bytes and compared whole; data usually differs in its first bytes and costs nothing."""
    head = min(len(block), 64)
    if block[:head] != _ZERO_BLOCK[:head]:
        return False
    return block.tobytes() == _ZERO_BLOCK[: len(block)]


def write_sparse(fd: int, data: Buffer, offset: int, direct: DirectWriter | None = None) -> None:
    """Write `data` at `offset` but leave all-zero 64 KiB blocks as holes (the file was truncated to size):
    a chunk holding a little data and trimmed or never-written space restores thin, and faster. With
    `direct`, every run it can take (aligned) bypasses the page cache."""
    view = memoryview(data)
    run_start = None
    for pos in range(0, len(data) + HOLE_BLOCK, HOLE_BLOCK):
        block = view[pos : pos + HOLE_BLOCK]
        if block and not _is_zero(block):
            if run_start is None:
                run_start = pos
            continue
        if run_start is not None:
            if direct is None or not direct.write(view[run_start:pos], offset + run_start):
                pwrite_all(fd, view[run_start:pos], offset + run_start)
            run_start = None


def raw_partial(dest: Path, fmt: DiskFormat) -> Path:
    """The raw file disk_output() writes a disk into until it is complete."""
    return dest.with_name(dest.name + (".partial" if fmt == "raw" else ".raw.partial"))


@contextmanager
def disk_output(dest: Path, fmt: DiskFormat, virtual_size: int) -> Iterator[int]:
    """A thin raw file of `virtual_size` to write a disk into (yields its fd); on success it is fsynced,
    converted to qcow2 if asked and renamed to `dest`; on any failure nothing is left behind."""
    if dest.exists():
        raise HotvmError(f"{dest} already exists", "restore into an empty directory or remove the file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    raw = raw_partial(dest, fmt)
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.ftruncate(fd, virtual_size)
            except OSError as exc:
                raise HotvmError(
                    f"cannot create {dest} of {virtual_size} bytes: {exc.strerror}",
                    "restore to a file system that can hold a file that large",
                ) from None
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        if fmt == "qcow2":
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)],
                check=True,
                capture_output=True,
                env=child_env(),
            )
            raw.unlink()
        os.rename(partial, dest)
    except BaseException:
        for leftover in (raw, partial):
            leftover.unlink(missing_ok=True)
        raise


def restore_disk(
    repo: Repository,
    record: DiskRecord,
    dest: Path,
    fmt: DiskFormat = "qcow2",
    *,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> RestoredDisk:
    """Workers fetch, decompress and verify objects into reused buffers (reads, zstd and the hash release
    the GIL, so they overlap); this thread alone writes them, in disk order: one writer keeps the writes
    sequential and large (4 MiB at chunk boundaries), O_DIRECT from the verified buffer where the file
    system allows it (DirectWriter). Zero chunks are never written (the file is thin from the start) and
    the file is synced once, at the end."""
    tune_for_large_buffers()
    places = record.places()
    order = sorted(places, key=lambda digest: places[digest][0].at)
    total = sum(hi - lo for where in places.values() for p in where for lo, hi in p.spans)
    written = 0
    window = 2 * workers
    spare: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(window + 1):  # at most window + 1 objects are between fetch and write
        spare.put(aligned_buffer(record.chunk_size))
    frames = threading.local()

    def fetch(digest: str) -> tuple[Buffer, mmap.mmap]:
        """An object's verified plain bytes, in a buffer from `spare` (handed back once written)."""
        first = places[digest][0]
        if getattr(frames, "buf", None) is None:
            frames.buf = bytearray(frame_bound(record.chunk_size))
        out = spare.get()
        try:
            length = first.length if first.patch else record.chunk_length(first.index)
            raw = repo.read_raw_chunk(digest, memoryview(out), length)
            if raw is not None and repo.chunk_id(raw) == digest:
                return raw, out  # incompressible: read straight into `out`, and verified
            data = verify_chunk(repo, record, first.index, digest,
                                lambda: repo.get_chunk(digest, record.chunk_size, frames.buf),
                                first.length if first.patch else None, out=out)  # fmt: skip
        except BaseException:
            spare.put(out)
            raise
        return data, out

    with (
        disk_output(dest, fmt, record.virtual_size) as fd,
        DirectWriter(raw_partial(dest, fmt)) as direct,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        in_flight: deque[tuple[str, Future[tuple[Buffer, mmap.mmap]]]] = deque()

        def write(limit: int) -> None:
            """Each distinct object is written wherever it occurs (a patched chunk's base around its
            patches, so the order of objects does not matter for the result)."""
            nonlocal written
            while len(in_flight) > limit:
                digest, fut = in_flight.popleft()
                data, out = fut.result()
                for p in places[digest]:
                    written += _place_checked(fd, record, data, p, direct)
                    start_writeback(fd, p.at, p.length)  # of what went buffered (unaligned pieces)
                spare.put(out)
                if progress:
                    progress(written, total)

        try:
            for digest in order:
                in_flight.append((digest, pool.submit(fetch, digest)))
                write(window)
            write(0)
        finally:
            for _, fut in in_flight:
                fut.cancel()
    return RestoredDisk(record.device, str(dest), fmt, record.virtual_size, written)


def frame_bound(chunk_size: int) -> int:
    """A buffer that holds any stored form of a chunk of `chunk_size` bytes: zstd's worst case
    (ZSTD_COMPRESSBOUND) plus encryption's nonce and tag, what get_chunk reads at most (a larger file is
    refused: formats/bounds.py)."""
    return chunk_max(chunk_size)


def restore_config(repo: Repository, manifest: Manifest, dest_dir: Path) -> list[str]:
    """Unpack the config archive under dest_dir/config (every member checked: see unpack_config)."""
    if manifest.config_archive is None:
        return []
    blob = repo.read_blob(manifest.vm, manifest.backup_id, manifest.config_archive.name)
    return unpack_config(manifest, blob, dest_dir)


def check_config_archive(manifest: Manifest, blob: bytes) -> bytes:
    """The (plain) config archive, checked against its manifest: a damaged one is never unpacked or used."""
    assert manifest.config_archive is not None
    if chunk_digest(blob) != manifest.config_archive.sha256:
        raise ChecksumMismatch(
            f"config archive of {manifest.vm}/{manifest.backup_id} is damaged",
            "restore the config from another backup (--backup ID)",
        )
    return blob


def unpack_config(manifest: Manifest, blob: bytes, dest_dir: Path) -> list[str]:
    """Check the (plain) config archive against the manifest and unpack it under dest_dir/config, through
    the one checked reader (configtar.unpack_config_archive: no member leaves dest_dir/config)."""
    return unpack_config_archive(check_config_archive(manifest, blob), dest_dir / "config")


def disk_file_name(device: str, fmt: DiskFormat) -> str:
    """Two devices that clean to the same name (`a:b`, `a_b`) fail the restore ("already exists")."""
    return f"{safe_name(device)}.{fmt}"

"""Export a frozen disk image into the chunk store: sparse-aware, zstd-compressed, checksummed, streamed.

The main thread only schedules chunks (those holding allocated extents); a small pool of workers reads,
hashes, compresses and uploads each one, so several reads are in flight at once. At most `2 * workers`
chunks are in memory, whatever the disk size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from hotvm.allocator import tune_for_large_buffers
from hotvm.formats.imagemap import ImageReader, Segment, data_segments, image_info
from hotvm.formats.manifest import ChunkEntry, DiskRecord, Patch, utcnow
from hotvm.formats.patchplan import by_chunk, plan_chunk
from hotvm.formats.rawframe import raw_frame
from hotvm.formats.repository import CHUNKS_DIR, Repository

CHUNK_SIZE = 4 * 1024 * 1024
ZSTD_LEVEL = 1
Progress = Callable[[int, int], None]
"""progress(bytes_done, bytes_total) over the allocated data of the image."""



def decompress_bounded(frame: bytes, limit: int) -> bytes:
    """A zstd frame's content, refused (ZstdError) when it is or claims to be larger than `limit`: zstd
    allocates what the frame header claims, whatever max_output_size says, so a forged header must not
    reach it."""
    if zstandard.frame_content_size(frame) > limit:
        raise zstandard.ZstdError(f"the frame claims more than {limit} bytes")
    return zstandard.ZstdDecompressor().decompress(frame, max_output_size=limit)


_zstd = threading.local()
"""This thread's zstd contexts (they are not thread-safe; making one per chunk costs 0.2-0.3 ms of 4 MiB)."""


def decompress_into(frame: bytes | memoryview, out: memoryview) -> memoryview:
    """A zstd frame's content written into `out` (a preallocated buffer: no new chunk-sized object, so a
    restore touches the same memory chunk after chunk), as the view of `out` it fills; refused (ZstdError)
    when it is or claims to be larger than `out`. The streaming window is capped at `out`'s size (a forged
    header cannot make zstd allocate its 128 MiB default); a frame the cap refuses goes through
    decompress_bounded instead. A truncated frame gives fewer bytes: the caller's length and hash checks
    catch it."""
    limit = len(out)
    if zstandard.frame_content_size(frame) > limit:
        raise zstandard.ZstdError(f"the frame claims more than {limit} bytes")
    window = max(1 << 20, 1 << max(limit - 1, 1).bit_length())
    dctx = getattr(_zstd, "dctx", None)
    if dctx is None or _zstd.window != window:
        dctx = _zstd.dctx = zstandard.ZstdDecompressor(max_window_size=window)
        _zstd.window = window
    try:
        reader = dctx.stream_reader(frame, read_size=max(len(frame), 1))
        done = 0
        while done < limit:
            n = reader.readinto(out[done:])
            if not n:
                break
            done += n
        if done == limit and reader.readinto(bytearray(1)):
            raise zstandard.ZstdError(f"the frame holds more than {limit} bytes")
    except zstandard.ZstdError:
        data = decompress_bounded(bytes(frame), limit)  # e.g. a valid frame with a wider window
        out[: len(data)] = data
        return out[: len(data)]
    return out[:done]


SAMPLES = 16
SAMPLE_SIZE = 8192
MIN_GAIN = 0.03
"""worth_compressing's test: 16 samples of 8 KiB, one in the middle of each 1/16 of the chunk, compressed
one by one at ZSTD_LEVEL, must shrink by MIN_GAIN (borg's "auto" compression uses the same 3 %). Chosen
with bench/compression.py's numbers (docs/benchmarks.md): 8 x 16 KiB stored 5 of 12 random chunks with 6 %
of text raw (3 of 12 with 9 %); 32 x 4 KiB costs 35 % more and, a sample being 1/32, needs two hit."""
SAMPLED_FROM = 4 * SAMPLES * SAMPLE_SIZE
"""Smaller objects (patches, small packs) are simply compressed: 512 KiB costs zstd at most 0.1 ms."""
_SAMPLE_OVERHEAD = 16
"""What zstd adds to a sample it cannot shrink (frame and block headers): at most this many bytes."""


def worth_compressing(data: memoryview) -> bool:
    """Whether zstd would shrink this chunk by MIN_GAIN or more, judged from SAMPLES spread samples: a
    chunk of random bytes (encrypted or already compressed guest data) is then stored without running the
    compressor over it, which costs 4-10x what building the raw frame does.

    Cost: 0.08 ms per incompressible 4 MiB chunk (zstd -1 on all of it: 0.55-1.4 ms), 0.02-0.05 ms for a
    compressible one (it stops once the samples so far have shrunk enough).
    What it can miss, and what that costs at worst: one sample fully inside compressible data that
    shrinks to half or less already passes the test, and a run longer than 1/16 of the chunk + 8 KiB
    (264 KiB of 4 MiB) always holds a whole sample; so what is stored raw although zstd would have shrunk
    it is a shorter run between two samples (under 6.4 % of the chunk, saving zstd less than that: 4.3 % of
    the chunk was the worst measured for Python source placed at random in random data), or data that
    shrinks by less than 3 % everywhere (less than 3 % of the chunk, by design). Only a chunk compressible
    everywhere except at the 16 sampled places would lose more; disk data is not laid out that way by
    chance. The other way round (samples compressible, the chunk not) costs only the CPU of compressing
    it, as before: zstd then writes raw blocks itself."""
    size = len(data)
    if size < SAMPLED_FROM:
        return True
    sampler = getattr(_zstd, "sampler", None)
    if sampler is None:
        sampler = _zstd.sampler = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=False)
    stride = size // SAMPLES
    need = MIN_GAIN * SAMPLES * SAMPLE_SIZE
    saved = 0
    for i in range(SAMPLES):
        at = i * stride + (stride - SAMPLE_SIZE) // 2
        saved += SAMPLE_SIZE - len(sampler.compress(data[at : at + SAMPLE_SIZE]))
        if saved >= need + _SAMPLE_OVERHEAD * (SAMPLES - 1 - i):
            return True  # the remaining samples cannot take it back below the threshold
    return saved >= need


def compress_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """A chunk's stored zstd frame: level ZSTD_LEVEL with this thread's compressor, or, for a chunk that
    worth_compressing finds incompressible, a frame of raw blocks built without it (rawframe.raw_frame:
    a standard zstd frame, which restores read with preadv straight into their buffer). Always a new
    object: the caller may reuse `data` once this returns."""
    view = memoryview(data).cast("B")
    if not worth_compressing(view):
        return raw_frame(view)
    compressor = getattr(_zstd, "cctx", None)
    if compressor is None:
        compressor = _zstd.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor.compress(view)


def chunk_digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def image_digest(chunks: list[ChunkEntry], chunk_count: int) -> str:
    """One hash over the ordered chunk list: identifies the whole image without hashing its zeros. A chunk
    without patches gives the line format 2 gave it, so older sets keep their digests."""
    lines: dict[int, str] = {}
    for entry in chunks:
        if len(entry) == 2:
            lines[entry[0]] = entry[1]
        else:
            lines[entry[0]] = lines.get(entry[0], "0") + f"+{entry[1]}@{entry[2]}:{entry[3]}"
    h = hashlib.sha256()
    for index in range(chunk_count):
        h.update(f"{index}:{lines.get(index, '0')}\n".encode())
    return h.hexdigest()


def chunk_count(virtual_size: int, chunk_size: int) -> int:
    return (virtual_size + chunk_size - 1) // chunk_size


def _segments_by_chunk(segments: list[Segment], chunk_size: int) -> dict[int, list[Segment]]:
    by_chunk: dict[int, list[Segment]] = {}
    for seg in segments:
        first, last = seg.start // chunk_size, (seg.start + seg.length - 1) // chunk_size
        for index in range(first, last + 1):
            by_chunk.setdefault(index, []).append(seg)
    return by_chunk


@dataclass
class _Counters:
    bytes_new: int = 0
    claimed: set[str] = field(default_factory=set)
    """Digests a worker of this export already stores: identical chunks are written once."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _store_chunk(repo: Repository, data: memoryview, counters: _Counters) -> str:
    digest = repo.chunk_id(data)  # sha256, or the keyed HMAC of an encrypted repository
    with counters.lock:
        if digest in counters.claimed:
            return digest
        counters.claimed.add(digest)
    if not repo.has_chunk(digest, for_write=True):
        stored = repo.put_chunk(digest, compress_chunk(data))
        with counters.lock:
            counters.bytes_new += stored
    return digest


@dataclass(frozen=True)
class _ChunkJob:
    """Everything a worker needs to read, check, hash, compress and store one chunk."""

    index: int
    start: int
    size: int
    segments: list[Segment]
    patch: bool = False
    """A patch (a range of chunk `index`): stored even when all zeros (it may cover a base's data)."""
    keep_zero: bool = False

    @property
    def data_bytes(self) -> int:
        return sum(
            min(s.start + s.length, self.start + self.size) - max(s.start, self.start) for s in self.segments
        )

    def prefetch(self, reader: ImageReader) -> None:
        for seg in self.segments:
            lo = max(seg.start, self.start)
            reader.prefetch(lo, min(seg.start + seg.length, self.start + self.size) - lo, seg)


def _export_chunk(
    job: _ChunkJob, reader: ImageReader, repo: Repository, counters: _Counters, zero: bytes
) -> str | None:
    """Runs in a worker thread, so several reads are in flight at once (deep queues read faster)."""
    buf = bytearray(job.size)
    view = memoryview(buf)
    for seg in job.segments:
        lo = max(seg.start, job.start)
        hi = min(seg.start + seg.length, job.start + job.size)
        reader.read_into(view[lo - job.start : hi - job.start], lo, seg)
    if not job.keep_zero and buf == (zero if job.size == len(zero) else bytes(job.size)):
        return None  # allocated but all zeros: costs nothing, restores as a hole
    return _store_chunk(repo, view, counters)


def export_image(
    repo: Repository,
    *,
    device: str,
    image: str,
    fmt: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    workers: int = 4,
    progress: Progress | None = None,
    frozen_at: dt.datetime | None = None,
    previous: DiskRecord | None = None,
    dirty: list[tuple[int, int]] | None = None,
) -> DiskRecord:
    """Copy `image` (which nobody writes to now) into the chunk store and describe it.

    Incremental (`previous` and `dirty` given): only what a dirty extent touches is read; every other
    chunk keeps its entries from `previous` (absent there: a zero chunk, absent here too). A chunk of which
    little changed is stored as patches over the parent's chunk (formats/patchplan.py), otherwise whole.
    The result is still the complete chunk list of the image.
    """
    started = time.monotonic()
    tune_for_large_buffers()  # chunk-sized buffers: see hotvm/allocator.py
    frozen_at = frozen_at or utcnow()
    info = image_info(image, fmt)
    entries: dict[int, list[ChunkEntry]] = {}
    reused_bytes = 0
    segments = data_segments(info)
    segs_by_chunk = _segments_by_chunk(segments, chunk_size)
    length = lambda i: min(chunk_size, info.virtual_size - i * chunk_size)  # noqa: E731
    if previous is not None and dirty is not None:
        if previous.virtual_size != info.virtual_size or previous.chunk_size != chunk_size:
            raise ValueError("incremental export needs the previous record's geometry")  # caller checks
        dirty_by_chunk = by_chunk(dirty, chunk_size)
        jobs = []
        for piece in previous.pieces():
            if piece.index not in dirty_by_chunk:
                entries[piece.index] = _entries(piece.index, piece.base, piece.patches)
                reused_bytes += length(piece.index)
        previous_pieces = {p.index: p for p in previous.pieces()}
        for index, ranges in sorted(dirty_by_chunk.items()):
            if index >= chunk_count(info.virtual_size, chunk_size):
                continue
            plan = plan_chunk(previous_pieces.get(index), ranges, length(index))
            segs = segs_by_chunk.get(index, [])
            if plan.whole:
                if segs:
                    jobs.append(_ChunkJob(index, index * chunk_size, length(index), segs))
                continue
            entries[index] = _entries(index, plan.base, plan.kept)
            for offset, size in plan.ranges:
                start = index * chunk_size + offset
                inside = [s for s in segs if s.start < start + size and start < s.start + s.length]
                keep_zero = plan.base is not None
                if inside or keep_zero:
                    jobs.append(_ChunkJob(index, start, size, inside, patch=True, keep_zero=keep_zero))
    else:
        jobs = [_ChunkJob(i, i * chunk_size, length(i), segs) for i, segs in sorted(segs_by_chunk.items())]
    total = sum(job.data_bytes for job in jobs)
    zero = bytes(chunk_size)
    counters = _Counters()
    in_flight: deque[tuple[_ChunkJob, Future[str | None]]] = deque()
    done_bytes = 0
    # grouped(): chunks (only) become durable in groups (targets/local.py); all are in place before it returns
    grouped = repo.target.grouped(CHUNKS_DIR)
    with ImageReader(info) as reader, grouped, ThreadPoolExecutor(max_workers=workers) as pool:

        def collect(limit: int) -> None:
            nonlocal done_bytes
            while len(in_flight) > limit:
                job, fut = in_flight.popleft()
                digest = fut.result()
                if digest is not None and job.patch:
                    offset = job.start - job.index * chunk_size
                    entries.setdefault(job.index, []).append((job.index, digest, offset, job.size))
                elif digest is not None:
                    entries[job.index] = [(job.index, digest)]
                done_bytes += job.data_bytes
                if progress:
                    progress(done_bytes, total)

        for job in jobs:
            job.prefetch(reader)  # its read starts now, not when a worker gets to it
            in_flight.append((job, pool.submit(_export_chunk, job, reader, repo, counters, zero)))
            collect(2 * workers)
        collect(0)
    chunks = [e for index in sorted(entries) for e in sorted(entries[index], key=_entry_order)]
    return DiskRecord(
        device=device,
        source_path=image,
        source_format=info.format,
        virtual_size=info.virtual_size,
        chunk_size=chunk_size,
        chunks=chunks,
        digest=image_digest(chunks, chunk_count(info.virtual_size, chunk_size)),
        frozen_at=frozen_at,
        bytes_read=done_bytes,
        bytes_new=counters.bytes_new,
        export_seconds=round(time.monotonic() - started, 3),
        bytes_reused=reused_bytes,
    )


def _entries(index: int, base: str | None, patches: tuple[Patch, ...]) -> list[ChunkEntry]:
    """The chunk-list entries of a chunk: its base (if any), then its patches."""
    out: list[ChunkEntry] = [(index, base)] if base is not None else []
    return out + [(index, p.digest, p.offset, p.length) for p in patches]


def _entry_order(entry: ChunkEntry) -> int:
    """A chunk's base first, then its patches by offset."""
    return -1 if len(entry) == 2 else entry[2]



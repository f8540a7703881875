"""Incompressible chunks without a decompression pass: where a stored zstd frame is nothing but raw
blocks, its content is its payloads, which a scatter read (preadv) can put straight into the restore's
buffer. That saves zstd's copy of every byte (0.14 s of CPU per GiB here, a fifth of a restore's), and
random data (encrypted or compressed guest files) is the data that has it.

Only the layout is trusted from here: the result is checked against the chunk's name like any other
(formats/restore.py), and a frame that is not exactly what is expected goes the usual way.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK_MAX = 128 * 1024
HEAD_MAX = 18
"""The longest zstd frame header: magic, descriptor, window byte, 4-byte dictionary id, 8-byte size."""


@dataclass(frozen=True)
class RawLayout:
    """Where a frame of only raw blocks keeps `length` content bytes: `header` bytes, then per block a
    3-byte block header and its payload, then a 4-byte checksum if `checksum`."""

    header: int
    length: int
    checksum: bool

    @property
    def blocks(self) -> int:
        return max(1, -(-self.length // BLOCK_MAX))

    @property
    def size(self) -> int:
        return self.header + 3 * self.blocks + self.length + (4 if self.checksum else 0)

    def views(self, out: memoryview, scratch: memoryview) -> list[memoryview]:
        """preadv's buffers: headers (and checksum) into `scratch`, payloads into out[:length]."""
        views, at = [scratch[: self.header]], self.header
        for i in range(self.blocks):
            views += [scratch[at : at + 3], out[i * BLOCK_MAX : min(self.length, (i + 1) * BLOCK_MAX)]]
            at += 3
        if self.checksum:
            views.append(scratch[at : at + 4])
        return views

    def check(self, head: bytes, scratch: memoryview) -> bool:
        """Whether what was read has exactly this layout: the same frame header as first seen, and every
        block raw, of its size, the last one marked last."""
        if bytes(scratch[: self.header]) != head[: self.header]:
            return False
        at = self.header
        for i in range(self.blocks):
            value = int.from_bytes(scratch[at : at + 3], "little")
            size = min(BLOCK_MAX, self.length - i * BLOCK_MAX)
            if value != (size << 3) | (0 << 1) | (i == self.blocks - 1):
                return False
            at += 3
        return True


def raw_layout(head: bytes, file_size: int, length: int) -> RawLayout | None:
    """The layout of a raw-blocks-only frame of `length` bytes whose file starts with `head` and is
    `file_size` long; None if it cannot be one (compressed, another size, not a plain zstd frame)."""
    if len(head) < 6 or head[:4] != MAGIC:
        return None
    fhd = head[4]
    if fhd & 0x08:  # reserved bit
        return None
    single = bool(fhd & 0x20)
    fcs_len = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    header = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 0x03] + fcs_len
    if len(head) < header:
        return None
    if fcs_len:
        content_size = int.from_bytes(head[header - fcs_len : header], "little")
        if content_size + (256 if fcs_len == 2 else 0) != length:
            return None
    layout = RawLayout(header, length, bool(fhd & 0x04))
    return layout if layout.size == file_size else None


MAX_SCATTER_BLOCKS = 500
"""Blocks of one scatter read at most (two buffers each: below the kernel's 1024 per preadv); a 4 MiB
chunk has 32."""


_LAST = 1
_FULL_BLOCK = (BLOCK_MAX << 3).to_bytes(3, "little")
"""A raw block header (type 0) of a full block that is not the last."""


def raw_frame(data: bytes | bytearray | memoryview) -> bytes:
    """A standard zstd frame holding `data` as raw (stored) blocks, built without the compressor: a
    single-segment frame header with the content size (4 bytes, 8 from 4 GiB), then 128 KiB blocks, the
    last one marked, no checksum. Every zstd decoder reads it (it is what zstd itself writes for data it
    cannot shrink, bar the window byte), raw_layout recognises it, and building it is one copy of the
    data (0.1 ms per 4 MiB here, against 0.5-1.4 ms for zstd level 1 on the same random bytes)."""
    view = memoryview(data).cast("B")
    n = len(view)
    head = MAGIC + (b"\xa0" + n.to_bytes(4, "little") if n < 1 << 32 else b"\xe0" + n.to_bytes(8, "little"))
    blocks = max(1, -(-n // BLOCK_MAX))
    parts: list[bytes | memoryview] = [head]
    for i in range(blocks - 1):
        parts += [_FULL_BLOCK, view[i * BLOCK_MAX : (i + 1) * BLOCK_MAX]]
    at = (blocks - 1) * BLOCK_MAX
    parts += [((n - at) << 3 | _LAST).to_bytes(3, "little"), view[at:]]
    return b"".join(parts)

"""What hotvm writes on a medium (docs/tape.md): framed records, tape files, and reading them back.

Every block holds one record: a 16-byte header (magic `HVT1`, kind, payload length, crc32 of the
payload) and up to RECORD_PAYLOAD bytes. A tape file is a run of records of one kind ended by a filemark:

    L  label     JSON: medium, library, copy id, sequence of this medium in the copy, created, expires,
                 and `continues` when the first file after it carries on a file cut at the previous medium
    A  archive   a tar stream (tarfile "w|") holding one whole backup set and every chunk it references
    C  catalog   JSON: which set is on which medium at which file number, with sizes and sha256
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator

from hotvm.tape.drive import BLOCK, Drive, TapeError

MAGIC = b"HVT1"
HEADER = struct.Struct(">4sBxxxII")  # magic, kind, pad, payload length, crc32
RECORD_PAYLOAD = BLOCK - HEADER.size
LABEL, ARCHIVE, CATALOG = b"L", b"A", b"C"


def frame(kind: bytes, payload: bytes) -> bytes:
    header = HEADER.pack(MAGIC, kind[0], len(payload), zlib.crc32(payload))
    return (header + payload).ljust(BLOCK, b"\0")


def unframe(block: bytes, medium: str) -> tuple[bytes, bytes]:
    """(kind, payload) of a block; TapeError for a block hotvm did not write or that is damaged."""
    magic, kind, length, crc = HEADER.unpack_from(block)
    payload = block[HEADER.size : HEADER.size + length]
    if magic != MAGIC or length > RECORD_PAYLOAD or zlib.crc32(payload) != crc:
        raise TapeError(
            f"a block on medium {medium} is not a hotvm tape record or is damaged",
            "use another copy; 'hotvm tape list' shows what the library holds",
        )
    return bytes([kind]), payload


class FileWriter:
    """A file-like object that cuts what is written into records of one kind and hands them to `put`."""

    def __init__(self, kind: bytes, put: Callable[[bytes, bytes], None]) -> None:
        self.kind, self.put, self.buffer, self.size = kind, put, bytearray(), 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= RECORD_PAYLOAD:
            self.put(self.kind, bytes(self.buffer[:RECORD_PAYLOAD]))
            del self.buffer[:RECORD_PAYLOAD]
        return len(data)

    def flush_all(self) -> None:
        if self.buffer or self.size == 0:
            self.put(self.kind, bytes(self.buffer))
            self.buffer.clear()


def read_file_records(drive: Drive) -> Iterator[tuple[bytes, bytes]]:
    """(kind, payload) of every record up to the next filemark (which is passed over)."""
    while (block := drive.read_block()) is not None:
        yield unframe(block, drive.medium)


class ChainReader:
    """A file-like reader over payloads from an iterator (a tape file, or its parts on several media)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.buffer = chunks, b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            try:
                self.buffer += next(self.chunks)
            except StopIteration:
                break
        if size < 0:
            size = len(self.buffer)
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

"""The backup-set manifest and its disk records: the typed form of what a backup writes to a target.

Everything here is read back from a target, so it is hostile input: names are never paths, sizes and
chunk indexes are bounded before anything is allocated, and every record carries its own checksum.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from hotvm import __version__
from hotvm.config import BootCheckSpec, StrictModel
from hotvm.formats.chunkid import ChunkHash

FORMAT_VERSION = 1
"""Format of an unencrypted repository marker written before repository ids existed (still read)."""
MANIFEST_FORMAT = 3
"""Format 3: a disk's chunk list may hold patch entries (docs/format.md, "Patches"). Formats 2 and 3 carry a
`checksum` (docs/format.md, "Checksums"); format 1 (older hotvm) has none and is read as legacy. Formats
1 and 2 are still read: their chunk lists are format 3 lists without patches."""
CHECKSUMS_SINCE = 2
"""The first manifest format that carries checksums: a manifest of this format or later without one is
refused; older ones are legacy (read, with a warning from check)."""

BACKUP_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-z]{1,16}$")
"""What new_backup_id produces (YYYYmmddTHHMMSSZ-xxxx); a caller-chosen suffix (a rerun's id) may be
longer, but only of these characters: a backup id is a path component on the target."""
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 256 << 20
MAX_CHUNKS = 1 << 24
"""Chunk indexes per disk: 64 TiB at the default 4 MiB chunk size (VMDK's limit is 62 TiB)."""
MAX_VIRTUAL_SIZE = 1 << 46
MAX_NAME = 255
MAX_PATCHES = 64
"""Patch entries on one chunk index: what a reader composes for one chunk is bounded (the writer stays far
below, see formats/patchplan.py)."""


def check_backup_id(value: str) -> str:
    if not BACKUP_ID.match(value):
        raise ValueError(f"backup id {value[:80]!r} is not of the form YYYYmmddTHHMMSSZ-xxxx")
    return value


def check_name(value: str, what: str = "name") -> str:
    """A VM or device name read from a manifest: any text a hypervisor may use, but never a path."""
    if not value or len(value) > MAX_NAME:
        raise ValueError(f"{what} must have 1 to {MAX_NAME} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in value) or "/" in value or value in (".", ".."):
        raise ValueError(f"{what} {value[:80]!r} holds a control character or '/', or is '.' or '..'")
    return value


def _checked(check, *args: str):  # noqa: ANN001, ANN202
    return BeforeValidator(lambda v: check(v, *args) if isinstance(v, str) else v)


BackupId = Annotated[str, _checked(check_backup_id)]
VMName = Annotated[str, _checked(check_name, "VM name")]
DeviceName = Annotated[str, _checked(check_name, "device name")]
Sha256Hex = Annotated[str, Field(pattern=SHA256_HEX.pattern)]


class Checksummed(StrictModel):
    """A record that carries the sha256 of its own canonical JSON, so that bit rot in any field of a
    manifest or journal read back from a target is a named error, never wrong data (an encrypted
    repository authenticates the whole file as well; an unencrypted one has only this)."""

    checksum: str | None = None

    def computed_checksum(self) -> str:
        body = json.loads(self.model_dump_json(exclude={"checksum"}))
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_checksum(self):  # noqa: ANN201 - returns the same model type
        return self.model_copy(update={"checksum": self.computed_checksum()})

    def checksum_problem(self, legacy: bool) -> str | None:
        """Why this record cannot be trusted, or None. `legacy`: written by a hotvm without checksums."""
        if self.checksum is None:
            return None if legacy else "its checksum is missing"
        if self.checksum != self.computed_checksum():
            return "its checksum does not match its content (bit rot or tampering)"
        return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_backup_id(now: dt.datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs."""
    now = now or utcnow()
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def id_time(backup_id: str) -> dt.datetime | None:
    """When the backup id was made (new_backup_id puts the UTC time first): a set's birth when nothing else
    tells; None if the id says no time."""
    try:
        return dt.datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


class StepTiming(StrictModel):
    step: str
    device: str | None = None
    seconds: float


class SkippedDisk(StrictModel):
    device: str
    path: str | None = None
    reason: str


ChunkEntry = tuple[int, Sha256Hex] | tuple[int, Sha256Hex, int, int]
"""(index, name): chunk `index` whole; (index, name, offset, length): a patch, `length` bytes that replace
bytes offset.. of chunk `index` (over that index's whole chunk, or zeros if it has none)."""


@dataclass(frozen=True)
class Patch:
    digest: str
    offset: int
    length: int


@dataclass(frozen=True)
class Piece:
    """Chunk `index` of a disk as a reader composes it: `base` (None: zeros) with `patches` laid over it
    (sorted by offset, never overlapping)."""

    index: int
    base: str | None
    patches: tuple[Patch, ...] = ()


@dataclass(frozen=True)
class Place:
    """Where the plain bytes of one stored object go on the disk: object bytes [lo, hi) of each span to
    disk offset `at + lo`. A patched chunk's base leaves out its patches' ranges, so the writes of one
    chunk's objects never overlap and may happen in any order (a tape delivers them in its own order)."""

    index: int
    length: int
    """Plain bytes the object must have: the chunk's length for a base, the patch's for a patch."""
    at: int
    spans: tuple[tuple[int, int], ...]
    patch: bool = False


class DiskRecord(Checksummed):
    """One exported disk: the ordered chunk list is the image; zero chunks are simply absent."""

    device: DeviceName
    source_path: str
    source_format: str
    virtual_size: int = Field(ge=0, le=MAX_VIRTUAL_SIZE)
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[ChunkEntry]
    """(chunk index, sha256 of the uncompressed chunk) for every chunk that is not all zeros; format 3 adds
    patch entries (index, sha256, offset, length) after their index's whole chunk (if any), by offset."""
    digest: Sha256Hex
    """sha256 over 'index:hash\\n' lines of every chunk (zero chunks as 'index:0'; patches appended to their
    line as '+hash@offset:length'): one value per image."""
    frozen_at: dt.datetime
    bytes_read: int = Field(ge=0)
    bytes_new: int = Field(ge=0)
    """Compressed bytes this export added to the chunk store (chunks already there cost nothing)."""
    export_seconds: float
    pivot_stall_ms: float | None = None
    bitmap: str | None = None
    """QEMU dirty bitmap (on the disk's image node) that tracks changes since this backup's freeze point."""
    incremental_from: str | None = None
    """Backup id whose chunk list this export started from (only chunks its bitmap marked dirty were read);
    None: a full read. Either way `chunks` is the complete image."""
    bytes_reused: int = 0
    """Bytes of non-zero chunks taken from `incremental_from`'s chunk list without reading them."""
    export_mode: str = ""
    """'incremental from <id>' or 'full (<why>)'."""

    @model_validator(mode="after")
    def _geometry(self) -> DiskRecord:
        """Sizes and indexes are bounded by the record's own geometry before anything is allocated."""
        if self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size {self.chunk_size} is not a power of two")
        count = self.chunk_count
        if count > MAX_CHUNKS:
            raise ValueError(f"virtual_size {self.virtual_size} needs {count} chunks (at most {MAX_CHUNKS})")
        previous, end, patches = -1, 0, 0
        for entry in self.chunks:
            index = entry[0]
            if len(entry) == 2:
                if not previous < index < count:
                    raise ValueError(
                        f"chunk index {index} is out of order, repeated or beyond the disk's {count} chunks"
                    )
                previous, end, patches = index, 0, 0
                continue
            offset, length = entry[2], entry[3]
            if index != previous:
                if not previous < index < count:
                    raise ValueError(
                        f"patch of chunk {index} is out of order or beyond the disk's {count} chunks"
                    )
                previous, end, patches = index, 0, 0
            patches += 1
            if patches > MAX_PATCHES:
                raise ValueError(f"chunk {index} has more than {MAX_PATCHES} patches")
            if not (end <= offset and length > 0 and offset + length <= self.chunk_length(index)):
                raise ValueError(
                    f"patch of chunk {index} at {offset}+{length} overlaps the one before it or leaves "
                    "the chunk"
                )
            end = offset + length
        return self

    @property
    def chunk_count(self) -> int:
        return -(-self.virtual_size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Plain bytes of chunk `index` (the last one may be short)."""
        return min(self.chunk_size, self.virtual_size - index * self.chunk_size)

    def pieces(self) -> list[Piece]:
        """Every chunk index that holds data, in order: the one view every reader composes chunks from."""
        out: list[Piece] = []
        for entry in self.chunks:
            index = entry[0]
            if len(entry) == 2:
                out.append(Piece(index, entry[1]))
                continue
            patch = Patch(entry[1], entry[2], entry[3])
            if out and out[-1].index == index:
                out[-1] = Piece(index, out[-1].base, (*out[-1].patches, patch))
            else:
                out.append(Piece(index, None, (patch,)))
        return out

    def refs(self) -> Iterator[tuple[int, str, int]]:
        """(index, name, plain length) of every stored object this disk uses: what check, copy, prune and
        tape mark and verify."""
        for entry in self.chunks:
            yield entry[0], entry[1], entry[3] if len(entry) == 4 else self.chunk_length(entry[0])

    def digests(self) -> set[str]:
        return {entry[1] for entry in self.chunks}

    def places(self) -> dict[str, list[Place]]:
        """Per stored object, where its bytes go on the disk (Place): what a restore writes, in any order."""
        out: dict[str, list[Place]] = {}
        for piece in self.pieces():
            at = piece.index * self.chunk_size
            if piece.base is not None:
                spans, pos = [], 0
                for patch in piece.patches:
                    if patch.offset > pos:
                        spans.append((pos, patch.offset))
                    pos = patch.offset + patch.length
                if pos < self.chunk_length(piece.index):
                    spans.append((pos, self.chunk_length(piece.index)))
                out.setdefault(piece.base, []).append(
                    Place(piece.index, self.chunk_length(piece.index), at, tuple(spans))
                )
            for patch in piece.patches:
                out.setdefault(patch.digest, []).append(
                    Place(piece.index, patch.length, at + patch.offset, ((0, patch.length),), patch=True)
                )
        return out


class ConfigArchive(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    sha256: Sha256Hex
    size: int = Field(ge=0)
    files: list[str]


class Manifest(Checksummed):
    format_version: int = MANIFEST_FORMAT
    tool_version: str = __version__
    kind: Literal["image"] = "image"
    backup_id: BackupId
    vm: VMName
    host: str
    driver: str
    started_at: dt.datetime
    completed_at: dt.datetime
    chunk_hash: ChunkHash = "sha256"
    """How chunks are named (the repository's scheme, hotvm/formats/chunkid.py): BLAKE3 or, in older
    repositories, sha256 of the content; keyed (encrypted repository) under its id key."""
    compression: Literal["zstd"] = "zstd"
    disks: list[DiskRecord]
    skipped_disks: list[SkippedDisk] = []
    consistency: Literal["crash", "application"] = "crash"
    """crash: the disks as after a power cut (the seed's hot backup); application: guest file systems
    were frozen (guest agent / VMware Tools quiescing) at the freeze point."""
    config_archive: ConfigArchive | None = None
    vm_description: dict = {}
    boot_check: BootCheckSpec | None = None
    steps: list[StepTiming] = []
    warnings: list[str] = []

    @model_validator(mode="after")
    def _unique_devices(self) -> Manifest:
        devices = [d.device for d in self.disks]
        if len(set(devices)) != len(devices):
            raise ValueError("a device is listed twice")
        return self

    def disk(self, device: str) -> DiskRecord:
        for disk in self.disks:
            if disk.device == device:
                return disk
        raise KeyError(device)

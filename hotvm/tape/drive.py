"""Sequential media: a file-backed virtual tape library (VTL) and a thin wrapper of a real tape drive.

Both speak the same small protocol, modelled on what `mt` and a SCSI drive in fixed-block mode offer:
blocks of exactly BLOCK bytes, filemarks, rewind, forward spacing over filemarks (`mt fsf`), spacing to
end of data (`mt eod`), and writes only at the end of the recorded data (or at the beginning of the
medium, which erases it: relabelling). Nothing here seeks backwards or reads at random.
"""

from __future__ import annotations

import abc
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from hotvm.child_env import child_env
from hotvm.errors import ConfigError, HotvmError

BLOCK = 64 * 1024
"""Every block on a medium has this size (fixed-block mode)."""
EARLY_WARNING = 4
"""Blocks kept free at the end of a medium: data writes stop there (EndOfMedium), filemarks may still use
them, so every medium ends with a filemark, like the early-warning zone of a real tape."""


class TapeError(HotvmError):
    """A tape or the library misbehaves, or is used in a way a tape does not allow."""


class EndOfMedium(TapeError):
    """The medium is full up to its early-warning zone: continue on the next medium."""


class EndOfData(TapeError):
    """Reading went past the last recorded block."""


class SequentialAccessError(TapeError):
    """A write that is neither at the end of the recorded data nor at the beginning of the medium."""


_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(f"tape capacity '{text}' is not a size", "write it like 2GiB, 512MiB or 800M")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


class Drive(abc.ABC):
    """One loaded medium, positioned between blocks. Every tape operation is abstract: a drive class that
    lacks one cannot be instantiated (a missing write must never pass as a silent no-op); only spacing
    over filemarks and the remaining-capacity query have defaults a drive may improve on."""

    medium: str

    @abc.abstractmethod
    def rewind(self) -> None:
        """Position at the beginning of the medium."""

    @abc.abstractmethod
    def read_block(self) -> bytes | None:
        """The next block, None for a filemark (passed over); EndOfData at the end of the recorded data."""

    @abc.abstractmethod
    def write_block(self, data: bytes) -> None:
        """Append one block of exactly BLOCK bytes; EndOfMedium in the early-warning zone."""

    @abc.abstractmethod
    def write_filemark(self) -> None:
        """Append a filemark."""

    def fsf(self, count: int = 1) -> None:
        """Space forward over `count` filemarks (reads forward, like `mt fsf`)."""
        while count > 0:
            if self.read_block() is None:
                count -= 1

    @abc.abstractmethod
    def eod(self) -> None:
        """Position after the last recorded block (where the next write goes)."""

    @abc.abstractmethod
    def erase(self) -> None:
        """Rewind and make the medium blank (only ever called on an expired medium)."""

    def remaining(self) -> int | None:
        """Blocks that can still be written before the early-warning zone, None if the drive cannot tell."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Flush what was written and release the medium."""


class VirtualMedium(Drive):
    """A medium file of a VTL: a sequence of slots, each a 1-byte kind (D data, F filemark) and a block."""

    SLOT = 1 + BLOCK

    def __init__(self, path: Path, capacity: int) -> None:
        self.path, self.medium = path, path.stem
        self.slots = capacity // self.SLOT
        if self.slots <= EARLY_WARNING + 2:
            raise ConfigError(
                f"tape capacity {capacity} is too small",
                f"give at least {(EARLY_WARNING + 3) * self.SLOT} bytes",
            )
        self.f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 - closed by close()
        self.pos = 0

    def _end(self) -> int:
        return os.fstat(self.f.fileno()).st_size // self.SLOT

    def rewind(self) -> None:
        self.pos = 0

    def read_block(self) -> bytes | None:
        if self.pos >= self._end():
            raise EndOfData(f"end of data on medium {self.medium}", "the tape holds nothing more here")
        self.f.seek(self.pos * self.SLOT)
        slot = self.f.read(self.SLOT)
        self.pos += 1
        return None if slot[:1] == b"F" else slot[1:]

    def fsf(self, count: int = 1) -> None:
        """Forward over `count` filemarks looking only at each slot's kind (a drive spaces fast too)."""
        end = self._end()
        while count > 0:
            if self.pos >= end:
                raise EndOfData(f"end of data on medium {self.medium}", "the tape holds fewer files")
            self.f.seek(self.pos * self.SLOT)
            if self.f.read(1) == b"F":
                count -= 1
            self.pos += 1

    def _append(self, kind: bytes, data: bytes) -> None:
        end = self._end()
        if self.pos != end:
            raise SequentialAccessError(
                f"write at block {self.pos} of medium {self.medium}, which holds {end} blocks",
                "a tape is written at the end of its data only (or relabelled from the beginning)",
            )
        if end >= self.slots or (kind == b"D" and end >= self.slots - EARLY_WARNING):
            raise EndOfMedium(f"medium {self.medium} is full", "continue on the next medium")
        self.f.seek(end * self.SLOT)
        self.f.write(kind + data.ljust(BLOCK, b"\0"))
        self.f.flush()
        self.pos += 1

    def write_block(self, data: bytes) -> None:
        if len(data) != BLOCK:
            raise TapeError(f"blocks are {BLOCK} bytes, got {len(data)}")
        self._append(b"D", data)

    def write_filemark(self) -> None:
        self._append(b"F", b"")

    def eod(self) -> None:
        self.pos = self._end()

    def erase(self) -> None:
        self.f.truncate(0)
        self.pos = 0

    def remaining(self) -> int:
        return max(0, self.slots - EARLY_WARNING - self._end())

    def close(self) -> None:
        os.fsync(self.f.fileno())
        self.f.close()


class Library(abc.ABC):
    """Media that can be loaded one at a time, by name."""

    name: str
    url: str
    media: list[str]
    capacity: int | None

    @abc.abstractmethod
    def load(self, medium: str) -> Drive:
        """The drive with `medium` loaded (TapeError if the library has no such medium)."""


class VirtualLibrary(Library):
    """`vtl:///srv/vtl?media=4&capacity=2GiB`: a directory of `media` medium files of fixed capacity."""

    def __init__(self, name: str, url: str) -> None:
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        self.name, self.url, self.root = name, url, Path(parsed.path)
        try:
            count = int(query.get("media", ["4"])[0])
        except ValueError:
            raise ConfigError(f"tape '{name}': media= must be a number", "e.g. ?media=4") from None
        self.capacity = parse_size(query.get("capacity", ["2GiB"])[0])
        self.root.mkdir(parents=True, exist_ok=True)
        self.media = [f"HV{i:04d}" for i in range(1, count + 1)]

    def load(self, medium: str) -> VirtualMedium:
        if medium not in self.media:
            raise TapeError(
                f"library '{self.name}' has no medium {medium}", f"media: {', '.join(self.media)}"
            )
        return VirtualMedium(self.root / f"{medium}.vtape", self.capacity)


class DeviceDrive(Drive):
    """A real tape drive (`/dev/nst0`, the non-rewinding device) in fixed-block mode, driven with `mt`.

    Untested: this kernel has no SCSI tape. It sets the block size, rewinds, spaces with `mt fsf`/`mt eod`,
    and reads/writes whole blocks; the early-warning zone shows as ENOSPC on write (EndOfMedium)."""

    def __init__(self, path: str) -> None:
        self.path, self.medium = path, "loaded"
        self._mt("setblk", str(BLOCK))
        self.fd = os.open(path, os.O_RDWR)

    def _mt(self, *args: str) -> None:
        proc = subprocess.run(["mt", "-f", self.path, *args], capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            raise TapeError(f"mt {' '.join(args)} on {self.path} failed: {proc.stderr.strip()}",
                            "check the drive and that a tape is loaded")

    def rewind(self) -> None:
        self._mt("rewind")

    _after_mark = False

    def read_block(self) -> bytes | None:
        data = os.read(self.fd, BLOCK)
        if not data:  # a read of 0 bytes is a filemark; two in a row mean end of data
            if self._after_mark:
                raise EndOfData(f"end of data on the tape in {self.path}", "the tape holds nothing more")
            self._after_mark = True
            return None
        self._after_mark = False
        return data

    def write_block(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC: early warning reached
                raise EndOfMedium(f"tape in {self.path} is full", "load the next medium") from None
            raise

    def write_filemark(self) -> None:
        self._mt("weof", "1")

    def fsf(self, count: int = 1) -> None:
        self._mt("fsf", str(count))

    def eod(self) -> None:
        self._mt("eod")

    def erase(self) -> None:
        self.rewind()

    def close(self) -> None:
        os.close(self.fd)


class DeviceLibrary(Library):
    """A single drive without a changer: one medium, the one that is loaded."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.url, self.capacity = name, url, None
        self.path = url.removeprefix("file://")
        self.media = ["loaded"]

    def load(self, medium: str) -> DeviceDrive:
        return DeviceDrive(self.path)


def open_library(name: str, url: str) -> Library:
    if url.startswith("vtl://"):
        return VirtualLibrary(name, url)
    if url.startswith("/dev/"):
        return DeviceLibrary(name, url)
    raise ConfigError(
        f"tape '{name}': unknown url '{url}'",
        "use vtl:///DIR?media=N&capacity=SIZE for a virtual library or a device path like /dev/nst0",
    )

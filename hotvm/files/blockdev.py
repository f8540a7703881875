"""Bytes of a guest disk, wherever they live: a raw file, any image qemu reads (qcow2 and its backing
chain), or the chunks of an image backup set.

Non-raw images are read through qemu's own block layer: a qemu-storage-daemon FUSE export makes the
guest's view of the image appear as one plain file, so no NBD client and no qcow2 parser is needed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from hotvm.child_env import child_env
from hotvm.errors import HotvmError
from hotvm.formats.manifest import DiskRecord
from hotvm.formats.repository import Repository
from hotvm.formats.restore import compose, verify_chunk

EXPORT_READY_TIMEOUT_S = 30.0
EXPORT_STOP_TIMEOUT_S = 15.0


class BlockSource(Protocol):
    """Random access to the guest's bytes of one disk."""

    size: int

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; short only at the end of the disk."""
        ...


class FileSource:
    """pread on an open file (a raw image, or a FUSE export of any other format)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)


def image_format(path: Path) -> str:
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )
    if proc.returncode != 0:
        raise HotvmError(f"cannot read disk image {path}: {proc.stderr.strip()}", "check the path")
    return json.loads(proc.stdout)["format"]


@contextmanager
def _open_file(path: Path, size: int | None = None) -> Iterator[FileSource]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield FileSource(fd, size if size is not None else os.fstat(fd).st_size)
    finally:
        os.close(fd)


@contextmanager
def open_image(path: str | Path, fmt: str | None = None) -> Iterator[BlockSource]:
    """The guest bytes of a disk image, read-only. Raw: pread on the file. Any other format: a
    qemu-storage-daemon FUSE export with force-share (a running VM's image lock does not block it), stopped
    and cleaned up on exit whatever happens.

    Pass `fmt` whenever the hypervisor knows it: probing lets a guest that wrote a qcow2 header into its
    raw disk choose the format (and a backing file on the host) itself."""
    path = Path(path)
    if not path.exists():
        raise HotvmError(f"disk image {path} does not exist", "check the path")
    fmt = fmt or image_format(path)
    if fmt == "raw":
        with _open_file(path) as source:
            yield source
        return
    with _fuse_export(path, fmt) as exported, _open_file(exported) as source:
        yield source


@contextmanager
def _fuse_export(path: Path, fmt: str) -> Iterator[Path]:
    """A private regular file that shows the image's guest bytes while the block is running."""
    workdir = Path(tempfile.mkdtemp(prefix="hotvm-export-"))
    os.chmod(workdir, 0o700)
    mountpoint = workdir / "disk"
    mountpoint.touch()
    pidfile = workdir / "qsd.pid"
    stderr_path = workdir / "qsd.err"
    file_node = {
        "driver": "file",
        "filename": str(path),
        "node-name": "f",
        "read-only": True,
        "force-share": True,
    }
    fmt_node = {"driver": fmt, "file": "f", "node-name": "q", "read-only": True, "force-share": True}
    args = [
        "qemu-storage-daemon",
        "--blockdev", json.dumps(file_node),
        "--blockdev", json.dumps(fmt_node),
        "--export", f"type=fuse,id=e,node-name=q,mountpoint={mountpoint},writable=off",
        "--pidfile", str(pidfile),
    ]  # fmt: skip
    proc = None
    try:
        with stderr_path.open("w") as err:
            # Own session: a Ctrl-C in the terminal reaches us (we stop it) and not qsd first.
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                env=child_env(),
            )
        _wait_export(proc, mountpoint, pidfile, stderr_path, path)
        yield mountpoint
    finally:
        if proc is not None:
            _stop(proc)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, env=child_env())
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_export(proc: subprocess.Popen, mountpoint: Path, pidfile: Path, stderr: Path, image: Path) -> None:
    deadline = time.monotonic() + EXPORT_READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise HotvmError(
                f"qemu-storage-daemon could not export {image}: {stderr.read_text().strip()}",
                "check that qemu-storage-daemon is installed, /dev/fuse exists and the image is readable",
            )
        if pidfile.exists() and os.path.ismount(mountpoint):
            return
        if time.monotonic() > deadline:
            raise HotvmError(
                f"qemu-storage-daemon did not export {image} within {EXPORT_READY_TIMEOUT_S:.0f}s: "
                f"{stderr.read_text().strip()}",
                "check the host's load and FUSE support",
            )
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # qsd unmounts its FUSE export on SIGTERM
    try:
        proc.wait(EXPORT_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class BackupDiskSource:
    """The guest bytes of a disk inside an image backup set: only the chunks asked for are fetched,
    verified and decompressed (formats.restore.verify_chunk), the last `cache_chunks` kept (LRU).
    Thread-safe; a chunk two threads want at once may be fetched twice, never returned unverified."""

    def __init__(self, repo: Repository, record: DiskRecord, cache_chunks: int = 64) -> None:
        self.repo = repo
        self.record = record
        self.size = record.virtual_size
        self.chunk_size = record.chunk_size
        self._pieces = {piece.index: piece for piece in record.pieces()}
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_chunks = max(1, cache_chunks)
        self._lock = threading.Lock()
        self._zeros = bytes(self.chunk_size)

    def _chunk(self, index: int) -> bytes:
        piece = self._pieces.get(index)
        if piece is None:
            return self._zeros
        key = piece.base if not piece.patches else repr(piece)  # a patched chunk: cached as composed
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        size = self.record.chunk_size
        data = compose(self.record, piece, lambda name, length: verify_chunk(
            self.repo, self.record, index, name, lambda: self.repo.get_chunk(name, size), length
        ))
        if len(data) < self.chunk_size:
            data += bytes(self.chunk_size - len(data))
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        parts = []
        pos = offset
        while pos < end:
            index, within = divmod(pos, self.chunk_size)
            take = min(self.chunk_size - within, end - pos)
            parts.append(self._chunk(index)[within : within + take])
            pos += take
        return b"".join(parts)


def open_backup_disk(repo: Repository, record: DiskRecord, cache_chunks: int = 64) -> BlockSource:
    """How image backups are browsed and single files pulled out of them, without restoring the disk."""
    return BackupDiskSource(repo, record, cache_chunks)

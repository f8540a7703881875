"""file:// targets: a local directory or a mounted NFS/CIFS share (the seed's first choice of target).

Files are written 0600 and directories 0700 (whatever the umask): a repository holds whole disks. The root
is created only on first use; once a repository is known there, a missing root (a share unmounted under
it) fails the write instead of filling the local disk below the mount point.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import unquote, urlparse

from fsspec.implementations.local import LocalFileSystem

from hotvm.config import TargetConfig
from hotvm.errors import TargetError
from targets.base import Target

FILE_MODE = 0o600
DIR_MODE = 0o700


HEAD_BYTES = 32
"""What read_scatter reads first for its plan (a zstd frame header is at most 18 bytes)."""

GROUP_BLOBS = 8
"""Blobs (32 MiB of chunks) handed to the background flusher at once for fsyncs and renames, inside
`grouped()`. Every blob gets its own fsync whatever the group size (its writeback already started when it
was written); a small group keeps the wait at the end of an export (the last group, synced in the caller)
short."""


class LocalTarget(Target):
    scheme = "file"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._grouping = 0
        self._pending: list[tuple[str, str]] = []
        self._grouped_under: set[str] = set()
        self._flusher: ThreadPoolExecutor | None = None
        self._flushes: list[Future[None]] = []

    def _put_durably(self, full_path: str, data: bytes, sync: bool = True) -> None:
        # fsync before the rename: a manifest must never point at chunks a power cut could lose, and a chunk
        # must never be under its name cut short (the next backup would take it as stored).
        fd = os.open(full_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.write(fd, view[done:])
            if sync:
                os.fsync(fd)
            else:
                # Start writing it back now, not at the group's fsync: the disk works while the next chunks
                # are read and compressed, and the fsync finds little left to do. (On Linux DONTNEED starts
                # writeback of the dirty pages; pages being written are not dropped.)
                with suppress(OSError, AttributeError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    @contextmanager
    def grouped(self, under: str) -> Iterator[None]:
        """Grouped durability: each blob goes to its temporary name unsynced (its writeback started at
        once), and every GROUP_BLOBS of them are fsynced one after the other and only then renamed, by one
        background flusher thread: a writer never waits for a group's fsyncs (measured: a worker stalled
        there held the export's in-order window, so every other worker went idle). A chunk still never
        appears under its name before its bytes are on disk, and every blob is synced and renamed before
        this returns (its first error is raised here)."""
        with self._lock:
            self._grouping += 1
            self._grouped_under.add(under)
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotvm-flush")
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._grouping -= 1
                last = not self._grouping
                if last:
                    self._grouped_under.clear()
            if last:
                self._finish_flushes(ok)
            if ok:
                with self._errors("writing", ""):
                    self._settle()
            else:
                self._discard_pending()

    def _finish_flushes(self, ok: bool) -> None:
        """Wait for every background group (all of them, even after an error: none is left running);
        raise the first error if the block itself succeeded."""
        with self._lock:
            flushes, self._flushes = self._flushes, []
            flusher, self._flusher = self._flusher, None
        errors = []
        for fut in flushes:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - the first one is raised below
                errors.append(exc)
        if flusher is not None:
            flusher.shutdown(wait=True)
        if ok and errors:
            if self._pending:
                self._discard_pending()
            with self._errors("writing", ""):
                raise errors[0]

    def write_bytes(self, path: str, data: bytes) -> None:
        with self._lock:
            deferred = any(path.startswith(prefix) for prefix in self._grouped_under)
        if not deferred:
            super().write_bytes(path, data)
            return
        final = self.full(path)
        with self._errors("writing", path):
            self._makedirs(os.path.dirname(final))
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                self._put_durably(tmp, data, sync=False)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
            with self._lock:
                self._pending.append((tmp, final))
                if len(self._pending) >= GROUP_BLOBS and self._flusher is not None:
                    batch, self._pending = self._pending, []
                    self._flushes.append(self._flusher.submit(self._settle, batch))
                failed = next((f for f in self._flushes if f.done() and f.exception()), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]  # a group failed: stop writing more

    def _settle(self, batch: list[tuple[str, str]] | None = None) -> None:
        """fsync then rename `batch` (default: every pending blob; other threads go on writing)."""
        if batch is None:
            with self._lock:
                batch, self._pending = self._pending, []
        try:
            for tmp, _ in batch:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for tmp, final in batch:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in batch:
                with suppress(OSError):
                    os.unlink(tmp)
            raise

    def _discard_pending(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for tmp, _ in batch:
            with suppress(OSError):
                os.unlink(tmp)

    def read_into(self, path: str, buf: bytearray) -> bytes | memoryview:
        """readinto `buf` (see Target.read_into); a file larger than `buf` is read whole as a new object."""
        with self._errors("reading", path):
            fd = os.open(self.full(path), os.O_RDONLY)
            try:
                view, done = memoryview(buf), 0
                while done < len(view):
                    n = os.readv(fd, [view[done:]])
                    if not n:
                        return view[:done]
                    done += n
                rest = os.read(fd, 1 << 20)
                if not rest:
                    return view
                chunks = [bytes(view), rest]
                while more := os.read(fd, 1 << 20):
                    chunks.append(more)
                return b"".join(chunks)
            finally:
                os.close(fd)

    def read_scatter(self, path: str, plan: Callable[[bytes, int], list[memoryview] | None]) -> bool:
        """One pread of the head, then one preadv of the whole file into the planned buffers."""
        with self._errors("reading", path):
            fd = os.open(self.full(path), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                views = plan(os.pread(fd, HEAD_BYTES, 0), size)
                if views is None:
                    return False
                done, at = 0, 0
                while views and done < size:
                    n = os.preadv(fd, views, at)
                    if not n:
                        return False  # shorter than it was a moment ago
                    done, at = done + n, at + n
                    while views and n >= len(views[0]):
                        n -= len(views.pop(0))
                    if views and n:
                        views[0] = views[0][n:]
                return not views and done == size
            finally:
                os.close(fd)

    def _makedirs(self, full_path: str) -> None:
        if self.root_known and not os.path.isdir(self.root):
            raise TargetError(
                f"target '{self.name}': its directory {self.root} is gone (share unmounted, or removed)",
                "mount it again (hotvm never re-creates a known target's directory) and rerun",
            )
        missing = []
        path = full_path
        while path and not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for new in reversed(missing):
            try:
                os.mkdir(new, DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(new, DIR_MODE)

    def free_bytes(self) -> int | None:
        path = self.root
        while not os.path.exists(path):
            path = os.path.dirname(path) or "/"
        return shutil.disk_usage(path).free


def open_local(config: TargetConfig) -> LocalTarget:
    url = config.url
    root = unquote(urlparse(url).path) if url.startswith("file://") else url
    return LocalTarget(config.name, url if "://" in url else f"file://{url}", LocalFileSystem(), root)

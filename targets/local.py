"""file:// targets: a local directory or a mounted NFS/CIFS share (the seed's first choice of target).

Files are written 0600 and directories 0700 (whatever the umask): a repository holds whole disks. The root
is created only on first use; once a repository is known there, a missing root (a share unmounted under
it) fails the write instead of filling the local disk below the mount point.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import unquote, urlparse

from fsspec.implementations.local import LocalFileSystem

from hotvm.config import TargetConfig
from hotvm.errors import TamperedBlob, TargetError
from targets.base import DEFAULT_LIMIT, Entry, Target
from targets.nofollow import open_nofollow

FILE_MODE = 0o600
DIR_MODE = 0o700


READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK
"""How blobs are opened (open_nofollow adds O_NOFOLLOW): O_NONBLOCK so that a FIFO planted as a chunk is
refused (not a regular file) instead of blocking the open; it changes nothing for regular files."""
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY

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
        self._real_root: str | None = None

    # -- opening inside the root: never through a symlink (targets/nofollow.py)
    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        """fd of root/path, refusing a symlink anywhere below the root (TamperedBlob)."""
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        full = os.path.join(self._real_root, path) if path else self._real_root
        try:
            return open_nofollow(full, flags, mode)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        raise self.not_regular(path, "a symbolic link, or below one") from None

    def not_regular(self, path: str, what: str) -> TamperedBlob:
        return TamperedBlob(
            f"{self.display(path)} on target '{self.name}' is {what}, not a file hotvm stores: the "
            "repository is damaged or tampered with (hotvm never follows links out of a target)",
            f"run 'hotvm check --target {self.name}' to see what is damaged; remove what is not hotvm's",
        )

    def exists(self, path: str) -> bool:
        """A regular file or a directory at `path`, found without following a symlink: a link planted under
        the name of a chunk the next backup stores is not that chunk (the backup writes it, and the rename
        replaces the link); a link above it is refused when the backup writes there."""
        with self._errors("checking", path):
            try:
                fd = self._open(path, os.O_PATH)
            except (FileNotFoundError, NotADirectoryError, TamperedBlob):
                return False
            try:
                mode = os.fstat(fd).st_mode
            finally:
                os.close(fd)
            return stat.S_ISREG(mode) or stat.S_ISDIR(mode)

    def _open_blob(self, path: str, limit: int) -> tuple[int, int]:
        """(fd, size) of a regular file of at most `limit` bytes (else TamperedBlob, nothing read)."""
        fd = self._open(path, READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self.not_regular(path, "not a regular file (a device, FIFO or socket)")
            if st.st_size > limit:
                raise self.too_large(path, limit, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def _put_durably(self, full_path: str, data: bytes, sync: bool = True) -> None:
        # fsync before the rename: a manifest must never point at chunks a power cut could lose, and a chunk
        # must never be under its name cut short (the next backup would take it as stored).
        # Not through a symlink either: `chunks/ab -> /etc` must not make a backup write into /etc.
        rel = os.path.relpath(full_path, self.root)
        fd = self._open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
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

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> bytes:
        """The file's size as fstat reports it (at most `limit`), in one read where the kernel allows."""
        with self._errors("reading", path):
            fd, size = self._open_blob(path, limit)
            try:
                first = os.read(fd, size)
                if len(first) == size:
                    return first
                pieces, done = [first], len(first)
                while done < size and (piece := os.read(fd, size - done)):
                    pieces.append(piece)
                    done += len(piece)
                return b"".join(pieces)
            finally:
                os.close(fd)

    def read_into(self, path: str, buf: bytearray, limit: int | None = None) -> bytes | memoryview:
        """readinto `buf` (see Target.read_into): the file's size as fstat reports it, refused beyond
        `limit` (default len(buf)); a file larger than `buf` but within `limit` is read as a new object."""
        limit = len(buf) if limit is None else limit
        with self._errors("reading", path):
            fd, size = self._open_blob(path, limit)
            try:
                if size > len(buf):
                    return self.read_bytes(path, limit)
                view, done = memoryview(buf)[:size], 0
                while done < size:
                    n = os.readv(fd, [view[done:]])
                    if not n:
                        return view[:done]  # shorter than it was a moment ago
                    done += n
                return view
            finally:
                os.close(fd)

    def read_scatter(self, path: str, plan: Callable[[bytes, int], list[memoryview] | None]) -> bool:
        """One pread of the head, then one preadv of the whole file into the planned buffers."""
        with self._errors("reading", path):
            fd, size = self._open_blob(path, 1 << 62)  # the plan's own buffers bound what is read
            try:
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

    # -- listing and deleting: never through a symlink either (prune deletes what it lists)
    def _open_dir(self, path: str) -> int | None:
        """fd of the directory root/path; None if it does not exist."""
        try:
            return self._open(path, DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def scan(self, path: str) -> list[Entry]:
        """What is in the directory, as it is: a symlink is listed as what it is (not a directory), never
        followed."""
        with self._errors("listing", path):
            fd = self._open_dir(path)
            if fd is None:
                return []
            try:
                entries = []
                with os.scandir(fd) as found:
                    for item in found:
                        st = item.stat(follow_symlinks=False)
                        entries.append(Entry(item.name, stat.S_ISDIR(st.st_mode), st.st_size,
                                             dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)))
            finally:
                os.close(fd)
        return sorted(entries, key=lambda e: e.name)

    def listdir(self, path: str) -> list[str]:
        return [e.name for e in self.scan(path)]

    def delete(self, path: str) -> None:
        """Unlink the name itself (a symlink is removed, never what it points to)."""
        self._remove_in_parent(path, os.unlink)

    def delete_tree(self, path: str) -> None:
        """shutil.rmtree below a parent opened without following symlinks (rmtree follows none inside)."""
        self._remove_in_parent(path, shutil.rmtree)

    def _remove_in_parent(self, path: str, remove: Callable[..., None]) -> None:
        """remove(name, dir_fd=parent) with the parent opened without following symlinks; gone is done."""
        parent, name = os.path.split(path)
        with self._errors("deleting", path):
            fd = self._open_dir(parent)
            if fd is None:
                return
            try:
                with suppress(FileNotFoundError):
                    remove(name, dir_fd=fd)
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

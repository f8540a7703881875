"""A backup target: a root on some storage, reached through an fsspec filesystem.

Only a handful of operations are needed by the backup-set format (put a blob atomically, read it, list,
delete), so every scheme behaves the same to the core and each scheme's quirks stay in its own module.

A scheme module overrides only what its filesystem does badly, through these hooks:
  _session()      the filesystem for one operation (pooled schemes hand each thread its own connection)
  _translate()    library exceptions -> one clear TargetError (OSError errnos are handled here)
  _put_durably()  how bytes land under the temporary name;  _rename(): how the temporary name becomes final
  _put_renamed()  both at once, where a protocol saves round trips that way
  atomic_put      True where one PUT is already atomic (object stores): no temporary name, no rename
Errors: FileNotFoundError passes through (the format relies on it); everything else becomes a TargetError
naming the target. TargetConfigError (also a ConfigError) marks what no retry can fix: a wrong password, an
unknown host key, a missing environment variable.
"""

from __future__ import annotations

import datetime as dt
import errno
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec

from hotvm.errors import BackupSetError, ConfigError, TamperedBlob, TargetError, TargetFull

if TYPE_CHECKING:
    from hotvm.config import TargetConfig

DEFAULT_LIMIT = 64 << 20
"""What read_bytes reads at most where its caller names no bound (hotvm's own callers always name one, from
what they expect: hotvm/formats/bounds.py)."""

_UNREACHABLE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTDOWN}


def redact_url(url: str) -> str:
    """The URL without any password (user names stay: they help to tell targets apart)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_upto(read: Callable[[int], bytes], most: int, piece: int = 4 << 20) -> bytes:
    """Read a stream until its end or `most` bytes, whichever comes first (a caller asks for limit + 1
    to tell a blob that is too large: the stream is then left unread beyond that)."""
    pieces, done = [], 0
    while done < most and (got := read(min(piece, most - done))):
        pieces.append(got)
        done += len(got)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def is_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, socket.timeout, TimeoutError, socket.gaierror)) or (
        isinstance(exc, OSError) and exc.errno in _UNREACHABLE)


@dataclass(frozen=True)
class Entry:
    """One name in a listing, with what the storage says about it (None where it says nothing)."""

    name: str
    is_dir: bool | None
    size: int | None
    modified: dt.datetime | None


def _modified(info: dict[str, Any]) -> dt.datetime | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        if isinstance(value, int | float) and value > 0:
            return dt.datetime.fromtimestamp(value, dt.UTC)
    return None


def _entry(info: dict[str, Any]) -> Entry:
    kind = info.get("type")
    size = info.get("size")
    return Entry(
        name=posixpath.basename(str(info["name"]).rstrip("/")),
        is_dir={"directory": True, "file": False}.get(kind) if isinstance(kind, str) else None,
        size=int(size) if isinstance(size, int | float) else None,
        modified=_modified(info),
    )


class Target:
    """Blob storage under `root` on an fsspec filesystem. Paths given to methods are relative to root."""

    scheme = "generic"
    atomic_put = False
    object_lock_days: float | None = None
    """Days every object written is locked for (S3 Object Lock, targets/s3.py); None: no locks. Where set,
    the target also has retained_until(path) and extend_lock(paths, until) (hotvm/immutability.py)."""
    config: TargetConfig | None = None
    """The configuration it was opened from (open_target sets it): where the repository is (its location)
    and what the instant-restore plugin reopens; its key is resolved by the caller (hotvm.credentials)."""
    makes_parents = False
    """True where _put_renamed creates a missing parent directory itself (SMB folds it into the write's
    compound request); write_bytes otherwise creates it first."""
    root_known = False
    """Set once a repository was opened here: from then on the root must already exist (a scheme whose root
    is a directory refuses to create it again: a vanished root is an unmounted share, not a new target)."""

    def __init__(self, name: str, url: str, fs: fsspec.AbstractFileSystem | None, root: str) -> None:
        self.name = name
        self.url = redact_url(url)
        self.fs = fs
        self.root = root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url}>"

    # -- paths
    def full(self, path: str) -> str:
        return posixpath.join(self.root, path) if path else self.root

    def display(self, path: str = "") -> str:
        return posixpath.join(self.url.rstrip("/"), path) if path else self.url

    @property
    def where(self) -> str:
        """host[:port] for messages about reaching the server."""
        parts = urlsplit(self.url)
        return parts.netloc.rpartition("@")[2] or self.url

    # -- error mapping: one clear message per failure, naming the target
    @contextmanager
    def _errors(self, what: str, path: str) -> Iterator[None]:
        try:
            yield
        except (TargetError, FileNotFoundError, ConfigError, BackupSetError):
            raise
        except Exception as exc:
            mapped = self._translate(exc, what, path)
            if mapped is None:
                raise
            raise mapped from None

    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        """Turn a library's exception into a TargetError (or FileNotFoundError); None keeps it as it is."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.full_error(what, path)
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return self.refused_error(what, path, exc.strerror or str(exc))
        if is_unreachable(exc):
            return self.unreachable_error(exc)
        if isinstance(exc, OSError):
            return TargetError(
                f"target '{self.name}' failed {what} {self.display(path)}: {exc}",
                "check that the target is reachable and mounted",
            )
        return None

    def full_error(self, what: str, path: str) -> TargetFull:
        return TargetFull(
            f"target '{self.name}' is full while {what} {self.display(path)}",
            "free space on it, prune old backups, or choose another target",
        )

    def refused_error(self, what: str, path: str, reason: str) -> TargetError:
        return TargetError(
            f"target '{self.name}' refused {what} {self.display(path)}: {reason}",
            "check permissions on the target (hotvm needs to create files there)",
        )

    def too_large(self, path: str, limit: int, size: int | None = None) -> TamperedBlob:
        """A blob larger than its caller's bound: refused before more than limit + 1 bytes are read."""
        said = f" (the server says {size} bytes)" if size is not None else ""
        return TamperedBlob(
            f"{self.display(path)} on target '{self.name}' is larger than the {limit} bytes hotvm ever "
            f"stores there{said}: the repository is damaged or tampered with",
            f"run 'hotvm check --target {self.name}' to see what is damaged; restore from another copy",
        )

    def bounded(self, path: str, data: bytes, limit: int) -> bytes:
        """`data` if it is within `limit` (read with limit + 1 as the most), else too_large."""
        if len(data) > limit:
            raise self.too_large(path, limit)
        return data

    def unreachable_error(self, exc: BaseException) -> TargetError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, EOFError):
            reason = "the server closed the connection"
        return TargetError(
            f"target '{self.name}' cannot reach {self.where} ({reason})",
            "check that the server is running and that the URL's host and port are right",
        )

    # -- the filesystem for one operation
    @contextmanager
    def _session(self) -> Iterator[Any]:
        yield self.fs

    # -- operations
    def connect(self) -> None:
        """Open the connection now (openers call it so that a wrong password fails at once)."""

    def check(self) -> None:
        """Fail early, with a clear message, if the target cannot be written."""
        probe = f".hotvm-probe-{uuid.uuid4().hex}"
        with self._errors("writing to", ""):
            self._makedirs(self.root)
            with self._session() as fs:
                self._put(fs, self.full(probe), b"ok")
                self._remove(fs, self.full(probe))

    def exists(self, path: str) -> bool:
        with self._errors("checking", path), self._session() as fs:
            return fs.exists(self.full(path))

    def exists_for_write(self, path: str) -> bool:
        """exists(), asked only to decide whether to write `path`: a scheme may answer False without asking
        the server where the answer cannot be True (SMB: its directory was created by this export), at the
        worst cost of writing a blob again whole."""
        return self.exists(path)

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> bytes:
        """A blob's bytes. A blob larger than `limit` is refused (TamperedBlob) having read at most
        limit + 1 bytes: a tampered target never makes hotvm allocate more than its caller expects.
        Schemes stream it and stop there, and refuse at once where the server reports a larger size."""
        with self._errors("reading", path), self._session() as fs, fs.open(self.full(path), "rb") as fh:
            size = getattr(fh, "size", None)
            if isinstance(size, int) and size > limit:
                raise self.too_large(path, limit, size)
            return self.bounded(path, fh.read(limit + 1), limit)

    def read_into(self, path: str, buf: bytearray, limit: int | None = None) -> bytes | memoryview:
        """A blob's bytes, read into `buf` where the target can (a view of it, valid until `buf` is reused:
        no new chunk-sized object per read), otherwise as a new object; larger than `limit` (default:
        len(buf)): refused as read_bytes does. This default reads a new object."""
        return self.read_bytes(path, len(buf) if limit is None else limit)

    def read_scatter(
        self, path: str, plan: Callable[[bytes, int], list[memoryview] | None]
    ) -> bool:
        """Read a blob straight into several buffers: `plan(first bytes, blob size)` gives them (None: not
        this blob); True once they are filled with the whole blob. False where the target cannot (this
        default), the plan declined, or the blob changed size: the caller reads it the usual way."""
        return False

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a blob so it appears whole or not at all (temporary name then rename, or one atomic PUT)."""
        final = self.full(path)
        with self._errors("writing", path):
            if self.atomic_put:
                with self._session() as fs:
                    self._put(fs, final, data)
                return
            if not self.makes_parents:
                self._makedirs(posixpath.dirname(final))
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
            with self._session() as fs:
                try:
                    self._put_renamed(fs, tmp, final, data)
                except BaseException:
                    with suppress(Exception):  # best-effort cleanup: the original error matters
                        self._remove(fs, tmp)
                    raise

    @contextmanager
    def grouped(self, under: str) -> Iterator[None]:
        """Bulk writes (export's chunks): inside it, write_bytes of a path starting with `under` may return
        before the blob is durable and under its name; all of them are by the time it ends without error.
        Only for blobs nobody reads back before then (every other path is written as always). Schemes where
        a blob is durable once written (every remote one) have nothing to group."""
        yield

    def _put_renamed(self, fs: Any, tmp: str, final: str, data: bytes) -> None:
        """Write `data` under `tmp`, then make it `final`; a scheme that can do both in fewer round trips
        overrides this (SMB)."""
        self._put(fs, tmp, data)
        self._rename(fs, tmp, final)

    def _put(self, fs: Any, full_path: str, data: bytes) -> None:
        self._put_durably(full_path, data)

    def _put_durably(self, full_path: str, data: bytes) -> None:
        """Kept for schemes that need no session (local files)."""
        assert self.fs is not None
        self.fs.pipe_file(full_path, data)

    def _rename(self, fs: Any, src: str, dst: str) -> None:
        """Replace dst by src (atomically where the protocol can)."""
        fs.mv(src, dst)

    def _remove(self, fs: Any, full_path: str) -> None:
        fs.rm_file(full_path)

    def _makedirs(self, full_path: str) -> None:
        with self._session() as fs:
            fs.makedirs(full_path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) directly under `path`; empty if it does not exist."""
        with self._errors("listing", path), self._session() as fs:
            try:
                entries = fs.ls(self.full(path), detail=False)
            except FileNotFoundError:
                return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def scan(self, path: str) -> list[Entry]:
        """listdir with type, size and modification time, fresh (no cached listing), where the filesystem
        reports them; schemes whose session is not an fsspec filesystem get names only (prune then leaves
        unreferenced chunks alone: it cannot tell them from chunks a running backup has just written)."""
        full = self.full(path)
        with self._errors("listing", path), self._session() as fs:
            if isinstance(fs, fsspec.AbstractFileSystem):
                fs.invalidate_cache(full)
                try:
                    infos = fs.ls(full, detail=True)
                except FileNotFoundError:
                    return []
                entries = [_entry(i) for i in infos if str(i["name"]).rstrip("/") != full.rstrip("/")]
                return sorted(entries, key=lambda e: e.name)
        return [Entry(name, None, None, None) for name in self.listdir(path)]

    def list_flat(self, path: str) -> list[str] | None:
        """Every file under `path` (paths relative to it) in as few requests as the storage allows; None
        where that would take one listing per directory anyway (callers then list what they need)."""
        return None

    def delete(self, path: str) -> None:
        with self._errors("deleting", path), self._session() as fs, suppress(FileNotFoundError):
            self._remove(fs, self.full(path))

    def delete_tree(self, path: str) -> None:
        with self._errors("deleting", path), self._session() as fs, suppress(FileNotFoundError):
            fs.rm(self.full(path), recursive=True)

    def free_bytes(self) -> int | None:
        """Free space where the target can tell (local mounts); None where it cannot."""
        return None

    def close(self) -> None:
        pass


C = TypeVar("C")


class Pool(Generic[C]):
    """Connections for protocols that carry one request at a time (FTP, an SFTP channel).

    `lease()` hands the calling thread a connection of its own and takes it back afterwards; a connection
    whose operation failed with anything but `keep_on` is closed rather than reused (it may be broken).
    """

    def __init__(self, factory: Callable[[], C], closer: Callable[[C], None],
                 keep_on: tuple[type[BaseException], ...] = (FileNotFoundError,),
                 alive: Callable[[C], bool] | None = None, check_after_s: float = 0.0) -> None:
        """`alive(conn)` is asked of a connection that sat idle `check_after_s` seconds or more, so that one
        the server dropped meanwhile (restart, idle timeout) is replaced instead of failing the next call."""
        self._factory, self._closer, self._keep_on = factory, closer, keep_on
        self._alive, self._check_after_s = alive, check_after_s
        self._idle: list[tuple[C, float]] = []
        self._lock = threading.Lock()

    def _take(self) -> C:
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn, since = self._idle.pop()
            if self._alive is None or time.monotonic() - since < self._check_after_s:
                return conn
            try:
                if self._alive(conn):
                    return conn
            except Exception:  # noqa: BLE001 - any failure of the probe means: do not use it
                pass
            self._discard(conn)
        return self._factory()

    @contextmanager
    def lease(self) -> Iterator[C]:
        conn = self._take()
        try:
            yield conn
        except self._keep_on:
            self._give_back(conn)
            raise
        except BaseException:
            self._discard(conn)
            raise
        self._give_back(conn)

    def _give_back(self, conn: C) -> None:
        with self._lock:
            self._idle.append((conn, time.monotonic()))

    def _discard(self, conn: C) -> None:
        with suppress(Exception):  # it is being thrown away because it may be broken
            self._closer(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._discard(conn)

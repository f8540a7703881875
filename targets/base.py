"""A backup target: a root on some storage, reached through an fsspec filesystem.

Only a handful of operations are needed by the backup-set format (put a blob atomically, read it, list,
delete), so every scheme behaves the same to the core and each scheme's quirks stay in its own module.
"""

from __future__ import annotations

import errno
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from hotvm.errors import TargetError, TargetFull


class Target:
    """Blob storage under `root` on an fsspec filesystem. Paths given to methods are relative to root."""

    scheme = "generic"

    def __init__(self, name: str, url: str, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.name = name
        self.url = url
        self.fs = fs
        self.root = root.rstrip("/") or "/"

    # -- paths
    def full(self, path: str) -> str:
        return posixpath.join(self.root, path) if path else self.root

    def display(self, path: str = "") -> str:
        return posixpath.join(self.url.rstrip("/"), path) if path else self.url

    # -- error mapping: one clear message per failure, naming the target
    @contextmanager
    def _errors(self, what: str, path: str) -> Iterator[None]:
        try:
            yield
        except TargetError:
            raise
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TargetFull(
                    f"target '{self.name}' is full while {what} {self.display(path)}",
                    "free space on it, prune old backups, or choose another target",
                ) from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise TargetError(
                    f"target '{self.name}' refused {what} {self.display(path)}: {exc.strerror or exc}",
                    "check permissions on the target (hotvm needs to create files there)",
                ) from None
            raise TargetError(
                f"target '{self.name}' failed {what} {self.display(path)}: {exc}",
                "check that the target is reachable and mounted",
            ) from None

    # -- operations
    def check(self) -> None:
        """Fail early, with a clear message, if the target cannot be written."""
        probe = f".hotvm-probe-{uuid.uuid4().hex}"
        with self._errors("writing to", ""):
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(self.full(probe), b"ok")
            self.fs.rm_file(self.full(probe))

    def exists(self, path: str) -> bool:
        with self._errors("checking", path):
            return self.fs.exists(self.full(path))

    def read_bytes(self, path: str) -> bytes:
        with self._errors("reading", path):
            return self.fs.cat_file(self.full(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a blob so it appears whole or not at all (temporary name, then rename)."""
        final = self.full(path)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        with self._errors("writing", path):
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            try:
                self._put_durably(tmp, data)
                self.fs.mv(tmp, final)
            except BaseException:
                try:
                    self.fs.rm_file(tmp)
                except Exception:  # noqa: BLE001 - best-effort cleanup, the original error matters
                    pass
                raise

    def _put_durably(self, full_path: str, data: bytes) -> None:
        self.fs.pipe_file(full_path, data)

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) directly under `path`; empty if it does not exist."""
        with self._errors("listing", path):
            try:
                entries = self.fs.ls(self.full(path), detail=False)
            except FileNotFoundError:
                return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def delete(self, path: str) -> None:
        with self._errors("deleting", path):
            try:
                self.fs.rm_file(self.full(path))
            except FileNotFoundError:
                pass

    def delete_tree(self, path: str) -> None:
        with self._errors("deleting", path):
            try:
                self.fs.rm(self.full(path), recursive=True)
            except FileNotFoundError:
                pass

    def free_bytes(self) -> int | None:
        """Free space where the target can tell (local mounts); None where it cannot."""
        return None

    def close(self) -> None:
        pass

"""The one checked way from an untrusted name to a local path.

Names read from a guest (file-set entries, a mounted restored disk), a manifest (vm, backup_id) or a tar
archive (config archives) are hostile: they may hold '/', '..', NUL, or point through a symlink that the
same data planted. Two tools keep every write inside the destination a user named:

- `component()` / `under()`: a name that must be ONE path component (a VM name, a backup id) is refused,
  not cleaned, when it is not: cleaning would make two names the same and hide the tampering.
- `SafeRoot`: every operation below a root walks the path component by component with directory file
  descriptors, opening each parent with O_NOFOLLOW. A symlink is never followed on the way down, whoever
  made it (the guest's own disk, the destination's owner, or this restore), so a write can never land
  outside the root. Callers create symlinks last, so no restored symlink is ever a parent of a write.

`printable()` turns a name (bytes in a guest, held as a surrogateescape str) into text for the catalog and
for messages, losslessly: `unprintable()` reverses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from hotvm.errors import HotvmError

MAX_NAME_BYTES = 255
"""What Linux file systems take as one name."""
MAX_PATH_BYTES = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64


class UnsafePath(HotvmError):
    """A name from untrusted data would leave its destination (or cannot be a name at all)."""


# ---------------------------------------------------------------------- display


_ESCAPE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")  # all but printable ASCII other than the backslash
_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    code = ord(ch)
    if ch == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if ch.isprintable():
        return ch
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(name: str) -> str:
    """`name` as text that prints and stores anywhere, like `ls -b`: a byte that is not UTF-8 and an ASCII
    control character as \\xNN, other unprintable characters as \\uXXXX, a backslash as \\\\.
    Lossless: `unprintable` gives the name back."""
    return _ESCAPE.sub(_escape, name)


def _unescape(m: re.Match[str]) -> str:
    body = m.group(1)
    if body == "\\":
        return "\\"
    code = int(body[1:], 16)
    if body[0] == "x" and code >= 0x80:
        return chr(0xDC00 + code)
    return chr(code)


def unprintable(text: str) -> str:
    """The name `printable` shows as `text` (a surrogateescape str: os functions get the exact bytes)."""
    return _UNESCAPE.sub(_unescape, text)


# ---------------------------------------------------------------------- names and paths


def component(name: object, what: str) -> str:
    """`name` if it is one safe path component, else UnsafePath naming `what` and the name."""
    if not isinstance(name, str):
        raise UnsafePath(f"{what} {name!r} is not a name", "the data was damaged or tampered with")
    problem = None
    if name in ("", ".", ".."):
        problem = "is not a name"
    elif "/" in name or "\0" in name:
        problem = "holds '/' or NUL"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise UnsafePath(
            f"{what} '{printable(name)[:80]}' {problem}: refused as a path component",
            "the backup data was tampered with or damaged; use another backup",
        )
    return name


def under(root: Path, *names: str, what: str = "name") -> Path:
    """root/name/...: each name checked to be a single component (manifest names -> host paths)."""
    return root.joinpath(*(component(n, what) for n in names))


def parts(path: str, what: str = "path") -> list[str]:
    """The components of a '/'-separated path relative to a root ('/a/b' and 'a/b' alike); refuses '..',
    '.', NUL, empty components and over-long names instead of dropping them."""
    if not isinstance(path, str):
        raise UnsafePath(f"{what} {path!r} is not a path", "the data was damaged or tampered with")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePath(f"{what} '{printable(path)[:80]}…' is too long", "use another backup")
    inner = path.strip("/")
    if not inner:
        return []
    try:
        return [component(p, what) for p in inner.split("/")]
    except UnsafePath:
        raise UnsafePath(
            f"{what} '{printable(path)[:200]}' leaves its directory or holds an impossible name",
            "the entry was skipped; the backup data was tampered with or damaged",
        ) from None


# ---------------------------------------------------------------------- SafeRoot


class SafeRoot:
    """File operations below `root` that never follow a symlink between the root and the entry.

    Paths are '/'-separated strings relative to the root (checked by `parts`). A parent that is missing is
    created (mode 0755 before the caller's metadata); a parent that is a symlink or not a directory raises
    UnsafePath. Use as a context manager (it holds directory file descriptors)."""

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        self._forget()
        os.close(self.fd)

    def __enter__(self) -> SafeRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forget(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _dir(self, names: tuple[str, ...], create: bool, path: str) -> int:
        """fd of the directory `names` below the root, walked without following symlinks."""
        if not names:
            return self.fd
        if names in self._dirs:
            return self._dirs[names]
        parent = self._dir(names[:-1], create, path)
        name = names[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
            fd = self._open_dir(name, parent, names, path)
        except OSError as exc:
            self._refuse(exc, names, path)
        self._dirs[names] = fd
        return fd

    def _open_dir(self, name: str, parent: int, names: tuple[str, ...], path: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            self._refuse(exc, names, path)

    def _refuse(self, exc: OSError, names: tuple[str, ...], path: str) -> NoReturn:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise UnsafePath(
                f"{printable(path)}: {printable('/'.join(names))} in {self.root} is a symlink or not a "
                "directory; not written through it",
                "the entry was skipped; remove or rename that path in the destination to restore it",
            ) from None
        raise exc

    def parent(self, path: str, create: bool = True, evict: bool = True) -> tuple[int, str]:
        """(fd of the parent directory, last name) of `path`; the root itself has no parent. The fd
        stays open until the next call with `evict` (the cache of directory fds is bounded)."""
        if evict and len(self._dirs) > _FD_CACHE:
            self._forget()
        names = parts(path)
        if not names:
            raise UnsafePath(f"'{printable(path)}' is the destination itself", "name a file inside it")
        return self._dir(tuple(names[:-1]), create, path), names[-1]

    # ---- queries
    def lstat(self, path: str) -> os.stat_result | None:
        """The entry itself (a symlink is not followed); None when it or a parent does not exist."""
        try:
            fd, name = self.parent(path, create=False)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def readlink(self, path: str) -> str | None:
        st = self.lstat(path)
        if st is None or not stat.S_ISLNK(st.st_mode):
            return None
        fd, name = self.parent(path, create=False)
        return os.readlink(name, dir_fd=fd)

    def read_bytes(self, path: str) -> bytes | None:
        """A regular file's content (None if missing); a symlink is refused, never read through."""
        try:
            fd, name = self.parent(path, create=False)
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._refuse(exc, tuple(parts(path)), path)
        with os.fdopen(file_fd, "rb") as f:
            return f.read()

    # ---- writing
    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """A directory at `path` (an existing directory is fine; anything else there raises)."""
        fd, name = self.parent(path)
        try:
            os.mkdir(name, mode, dir_fd=fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(
                    f"{printable(path)}: a file or symlink is in the way of a directory in {self.root}",
                    "restore with --overwrite, or into an empty directory",
                ) from None

    def write_file(self, path: str, blocks: Iterable[bytes], size: int, mode: int = 0o600) -> int:
        """Exactly `size` bytes from `blocks` at `path`: written to a new temporary name (O_EXCL, never
        through a symlink), checked, then renamed over the old entry. Returns the bytes written."""
        from hotvm.errors import ChecksumMismatch

        fd, name = self.parent(path)
        tmp = f".hotvm-{secrets.token_hex(6)}.partial"
        out = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd
        )
        written = 0
        try:
            with os.fdopen(out, "wb") as f:
                for block in blocks:
                    written += len(block)
                    if written > size:
                        break
                    f.write(block)
            if written != size:
                raise ChecksumMismatch(
                    f"{printable(path)}: the backup holds {'more' if written > size else written} bytes, "
                    f"its entry says {size}",
                    "the backup is damaged; restore this file from another backup",
                )
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            raise
        return written

    def write_bytes(self, path: str, data: bytes, mode: int = 0o600) -> None:
        self.write_file(path, [data], len(data), mode)
        fd, name = self.parent(path)
        os.chmod(name, mode, dir_fd=fd)  # the umask applied at creation

    def symlink(self, target: str, path: str) -> None:
        """A symlink at `path` pointing at `target` (never resolved here: it is only data)."""
        if "\0" in target:
            raise UnsafePath(f"{printable(path)}: symlink target holds NUL", "the entry was skipped")
        fd, name = self.parent(path)
        os.symlink(target, name, dir_fd=fd)

    def link(self, existing: str, path: str) -> None:
        """A hard link at `path` to the entry at `existing` (both below the root, neither followed)."""
        fd, name = self.parent(path)
        src_fd, src = self.parent(existing, create=False, evict=False)
        os.link(src, name, src_dir_fd=src_fd, dst_dir_fd=fd, follow_symlinks=False)

    def remove(self, path: str) -> None:
        """Whatever is at `path`: a file or symlink is unlinked, a directory removed with its tree (never
        following a symlink inside it). Missing is fine."""
        try:
            fd, name = self.parent(path, create=False)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._forget()  # cached fds may be inside it
            fd, name = self.parent(path, create=False)
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)

    def set_metadata(
        self, path: str, mode: int | None, owner: tuple[int, int] | None, times_ns: tuple[int, int] | None
    ) -> None:
        """Mode (not on symlinks), owner and times of the entry itself; OSError if the file system
        cannot hold them (the caller reports it)."""
        fd, name = self.parent(path, create=False)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if owner is not None:
            os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
        if mode is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(name, mode, dir_fd=fd)  # checked just above: not a symlink, so nothing is followed
        if times_ns is not None:
            os.utime(name, ns=times_ns, dir_fd=fd, follow_symlinks=False)

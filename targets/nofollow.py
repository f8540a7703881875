"""Open a path below a local target's root without following any symlink (docs/security.md).

Whoever can write into a file:// target (an NFS or CIFS server, a user with access to the directory) can
make a chunk a symlink to /etc/shadow, or `chunks/ab` a symlink to /etc: followed, hotvm would read host
files as blobs (and copy them elsewhere), or prune would delete host files as unreferenced chunks. So every
path inside the root is opened by one openat2(RESOLVE_NO_SYMLINKS) call: the kernel refuses a symlink in
any component (ELOOP), at no more cost than the plain open it replaces. The root itself is the operator's
(hotvm.yaml) and may go through symlinks: it is resolved once with realpath. Where openat2 is missing
(Linux before 5.6, or a seccomp filter refusing it) each component is opened O_NOFOLLOW in turn instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

SYS_OPENAT2 = 437
"""The same number on every Linux architecture (syscalls added since 5.1 share one table)."""
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_works: bool | None = None
"""None until the first call tells whether this kernel (and seccomp filter) allows openat2."""


def open_nofollow(path: str, flags: int, mode: int = 0) -> int:
    """os.open(path, flags, mode) for an absolute `path` without a symlink in it: OSError(ELOOP) if there
    is one (the last component too), FileNotFoundError etc. as os.open. The fd is close-on-exec."""
    global _works
    if _works is not False:
        how = _OpenHow(flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode if flags & os.O_CREAT else 0,
                       RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(AT_FDCWD), os.fsencode(path),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            _works = True
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM) or _works:
            raise OSError(err, os.strerror(err), path)
        _works = False
    return _walk(path, flags, mode)


def _walk(path: str, flags: int, mode: int) -> int:
    """The same without openat2: each directory opened O_NOFOLLOW relative to its parent."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            if part in (".", ".."):
                raise OSError(errno.ELOOP, "a '.' or '..' component", path)
            new = _open_at(fd, part, os.O_RDONLY | os.O_DIRECTORY, 0, path)
            os.close(fd)
            fd = new
        if not parts:
            return os.dup(fd)
        return _open_at(fd, parts[-1], flags, mode, path)
    finally:
        os.close(fd)


def _open_at(fd: int, name: str, flags: int, mode: int, path: str) -> int:
    """O_NOFOLLOW; a symlink is ELOOP whatever the flags (with O_DIRECTORY the kernel says ENOTDIR)."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
        raise

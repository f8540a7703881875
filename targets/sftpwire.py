"""SFTP version 3 spoken over the pipes of OpenSSH's own client (`ssh -s sftp`), as OpenSSH's `sftp` does.

Why: paramiko encrypts, MACs and frames every 32 KiB SSH packet in Python with the GIL held, which held
hotvm's SFTP target to about half of `sftp put`/`get` on loopback (docs/benchmarks.md). Here `ssh` does the
transport in C (key exchange, ciphers, host-key checking against known_hosts, authentication) and this
module only frames SFTP requests: a 4 MiB blob is 17 WRITE or READ requests of up to 255 KiB (the server's
limits@openssh.com), sent pipelined, the payload handed to the pipe with writev and read into the
destination buffer, never copied in Python.

Everything the server sends is hostile: message and payload lengths are bounded before anything is
allocated, every reply must answer a request that is outstanding, with the type that request allows.
A `Session` serves one thread at a time (the target's pool hands each thread its own).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import IO, Any, TypeVar

T = TypeVar("T")

# message types (draft-ietf-secsh-filexfer-02)
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, STAT, RENAME = 11, 12, 13, 14, 15, 17, 18
STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED, EXTENDED_REPLY = 101, 102, 103, 104, 105, 200, 201
# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
# open flags
F_READ, F_WRITE, F_CREAT, F_TRUNC = 0x01, 0x02, 0x08, 0x10
# attribute flags
A_SIZE, A_UIDGID, A_PERMISSIONS, A_ACMODTIME, A_EXTENDED = 0x01, 0x02, 0x04, 0x08, 0x80000000

MAX_MESSAGE = 256 * 1024 + 1024
"""Largest reply accepted (OpenSSH's SFTP_MAX_MSG_LENGTH is 256 KiB): a longer length field is an error,
not an allocation."""
DEFAULT_IO = 32 * 1024
"""Request size when the server does not state its limits (the size every SFTP server must accept)."""
MAX_IO = 255 * 1024
IN_FLIGHT = 64
"""Requests outstanding at once (OpenSSH sftp's -R default). It also bounds what the server has to queue:
the replies to 64 WRITEs are a few KiB, so the pipes never fill in both directions at once."""
PIPE_SIZE = 1 << 20
MAX_FILE = 1 << 30
"""Largest file read whole (a chunk is at most 256 MiB): a bigger size from the server is refused before
the buffer is allocated."""



class FileTooLarge(OSError):
    """The server says a file is larger than the caller reads."""

    def __init__(self, size: int, path: str) -> None:
        super().__init__(errno.EFBIG, f"the server says the file has {size} bytes: too big", path)
        self.size = size


_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IBI")  # length, type, request id
_READ = struct.Struct(">QI")


class ProtocolError(ConnectionError):
    """The server's reply makes no sense (or it went away mid-reply): the session cannot be used further."""


class SessionClosed(ConnectionError):
    """ssh ended. `stderr` is what it said (the caller turns it into one clear line)."""

    def __init__(self, stderr: str, returncode: int | None) -> None:
        super().__init__(errno.ECONNRESET, "the ssh connection ended")
        self.stderr, self.returncode = stderr, returncode


class StatusError(OSError):
    """A STATUS reply other than OK. `code` is the SFTP status; OSError's errno is set where one fits."""

    def __init__(self, code: int, message: str, path: str) -> None:
        eno = {NO_SUCH_FILE: errno.ENOENT, PERMISSION_DENIED: errno.EACCES,
               OP_UNSUPPORTED: errno.ENOTSUP}.get(code)
        super().__init__(eno, message or f"SFTP status {code}", path)
        self.code = code


def _status_error(code: int, message: str, path: str) -> OSError:
    if code == NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, message or "No such file", path)
    if code == PERMISSION_DENIED:
        return PermissionError(errno.EACCES, message or "Permission denied", path)
    return StatusError(code, message, path)


@dataclass(frozen=True)
class Attrs:
    size: int | None
    mode: int | None
    mtime: int | None


@dataclass(frozen=True)
class Name:
    filename: str
    attrs: Attrs


class _Buf:
    """A cursor over one reply's payload; running past its end is a ProtocolError."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("SFTP reply shorter than its fields")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def string(self) -> bytes:
        return bytes(self.take(self.u32()))

    def text(self) -> str:
        return self.string().decode("utf-8", "surrogateescape")

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & A_SIZE else None
        if flags & A_UIDGID:
            self.take(8)
        mode = self.u32() if flags & A_PERMISSIONS else None
        mtime = None
        if flags & A_ACMODTIME:
            self.take(4)
            mtime = self.u32()
        if flags & A_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return Attrs(size, mode, mtime)


def _string(value: bytes | str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return _U32.pack(len(raw)) + raw


NO_ATTRS = _U32.pack(0)


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """A request that failed in the transport or broke the protocol leaves the session unusable: say so."""

    @functools.wraps(method)
    def run(self: Session, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (ProtocolError, SessionClosed, TimeoutError):
            self._broken = True
            raise
    return run


class Session:
    """One `ssh -s sftp` child and the SFTP session over its pipes."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], io_timeout: float,
                 stderr: IO[bytes]) -> None:
        self.io_timeout = io_timeout
        self._stderr = stderr
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, start_new_session=True, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._w, self._r = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        for fd in (self._w, self._r):
            os.set_blocking(fd, False)
            with suppress(OSError):  # above /proc/sys/fs/pipe-max-size for this user: the default works too
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._buf = bytearray()
        self._next_id = 1
        self._outstanding = 0  # requests sent and not yet answered: not 0 after an error = out of step
        self._broken = False
        self.extensions: dict[str, bytes] = {}
        self.max_read = self.max_write = DEFAULT_IO

    # -- start
    @_guarded
    def start(self, connect_timeout: float) -> None:
        """INIT/VERSION: the first reply only comes once ssh has connected and authenticated, so an ssh
        that fails (refused, unknown host key, wrong password) ends here as SessionClosed."""
        self._send([_HEAD.pack(5, INIT, 3)])
        deadline = time.monotonic() + connect_timeout
        length = _U32.unpack(self._recv(4, deadline))[0]
        if not 5 <= length <= MAX_MESSAGE:
            raise ProtocolError(f"SFTP greeting of {length} bytes")
        buf = _Buf(self._recv(length, deadline))
        if buf.take(1)[0] != VERSION:
            raise ProtocolError("the server's first SFTP message is not VERSION")
        if buf.u32() < 3:
            raise ProtocolError("the server speaks an SFTP version older than 3")
        while buf.pos < len(buf.data):
            name = buf.text()
            self.extensions[name] = buf.string()
        if "limits@openssh.com" in self.extensions:
            reply = self._call(_string("limits@openssh.com"), EXTENDED, "")
            if reply.type == EXTENDED_REPLY:
                packet, read, write = reply.buf.u64(), reply.buf.u64(), reply.buf.u64()
                fit = (packet or MAX_MESSAGE) - 1024  # room for the request's own fields
                self.max_read = max(DEFAULT_IO, min(MAX_IO, read or DEFAULT_IO, fit))
                self.max_write = max(DEFAULT_IO, min(MAX_IO, write or DEFAULT_IO, fit))

    # -- raw pipe I/O with timeouts (both ends non-blocking)
    def _lost(self) -> SessionClosed:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read()[-16384:].decode("utf-8", "replace")
        return SessionClosed(text, code)

    def _wait(self, fd: int, write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not any(select.select([] if write else [fd], [fd] if write else [], [], left)[:2]):
            raise TimeoutError(errno.ETIMEDOUT, f"no answer from the server for {self.io_timeout:.0f} s")

    def _send(self, parts: list[bytes | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        deadline = time.monotonic() + self.io_timeout
        while views:
            try:
                n = os.writev(self._w, views)
            except BlockingIOError:
                self._wait(self._w, True, deadline)
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise self._lost() from None
            deadline = time.monotonic() + self.io_timeout
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0], n = views[0][n:], 0

    def _fill(self, want: int, deadline: float) -> None:
        """Read at most `want` bytes: never past the message asked for, so that a payload that follows
        is read straight into its destination, not through this buffer."""
        while True:
            try:
                data = os.read(self._r, want)
            except BlockingIOError:
                self._wait(self._r, False, deadline)
                continue
            if not data:
                raise self._lost()
            self._buf += data
            return

    def _recv(self, n: int, deadline: float | None = None) -> bytes:
        deadline = deadline or time.monotonic() + self.io_timeout
        while len(self._buf) < n:
            self._fill(n - len(self._buf), deadline)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _recv_into(self, view: memoryview) -> None:
        """Fill `view` from what is buffered, then straight from the pipe (no copy of the payload)."""
        have = min(len(self._buf), len(view))
        view[:have] = self._buf[:have]
        del self._buf[:have]
        pos, deadline = have, time.monotonic() + self.io_timeout
        while pos < len(view):
            try:
                n = os.readv(self._r, [view[pos:]])
            except BlockingIOError:
                self._wait(self._r, False, deadline)
                continue
            if n == 0:
                raise self._lost()
            pos += n
            deadline = time.monotonic() + self.io_timeout

    # -- requests and replies
    def _request(self, body: bytes, kind: int, payload: memoryview | None = None) -> int:
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF
        self._outstanding += 1
        size = 5 + len(body) + (4 + len(payload) if payload is not None else 0)
        head = _HEAD.pack(size, kind, rid)
        self._send([head, body] if payload is None else [head, body, _U32.pack(len(payload)), payload])
        return rid

    def _reply(self, rid: int, into: memoryview | None = None) -> _Reply:
        """The next reply, which must answer request `rid` (OpenSSH answers in order; one that does not is
        refused rather than guessed at). A DATA reply is read into `into` when given."""
        length, kind, got = _HEAD.unpack(self._recv(9))
        self._outstanding -= 1
        if got != rid:
            raise ProtocolError(f"SFTP reply to request {got}, expected {rid}")
        if length < 5 or length > MAX_MESSAGE:
            raise ProtocolError(f"SFTP reply of {length} bytes")
        if kind == DATA and into is not None:
            size = _U32.unpack(self._recv(4))[0]
            if size > len(into) or length != 9 + size:
                raise ProtocolError(f"SFTP DATA of {size} bytes for a read of {len(into)}")
            self._recv_into(into[:size])
            return _Reply(DATA, _Buf(b""), size)
        return _Reply(kind, _Buf(self._recv(length - 5)), 0)

    def _call(self, body: bytes, kind: int, path: str) -> _Reply:
        return _check(self._reply(self._request(body, kind)), path)

    # -- operations
    @_guarded
    def stat(self, path: str) -> Attrs:
        return _attrs(self._call(_string(path), STAT, path), path)

    @_guarded
    def lstat(self, path: str) -> Attrs:
        return _attrs(self._call(_string(path), LSTAT, path), path)

    @_guarded
    def mkdir(self, path: str) -> None:
        _status(self._call(_string(path) + NO_ATTRS, MKDIR, path), path)

    @_guarded
    def rmdir(self, path: str) -> None:
        _status(self._call(_string(path), RMDIR, path), path)

    @_guarded
    def remove(self, path: str) -> None:
        _status(self._call(_string(path), REMOVE, path), path)

    @_guarded
    def rename(self, src: str, dst: str) -> None:
        _status(self._call(_string(src) + _string(dst), RENAME, src), src)

    @_guarded
    def posix_rename(self, src: str, dst: str) -> None:
        """Atomic replace (posix-rename@openssh.com); StatusError OP_UNSUPPORTED where the server has none."""
        if "posix-rename@openssh.com" not in self.extensions:
            raise StatusError(OP_UNSUPPORTED, "no posix-rename@openssh.com", src)
        body = _string("posix-rename@openssh.com") + _string(src) + _string(dst)
        _status(self._call(body, EXTENDED, src), src)

    @_guarded
    def free_bytes(self, path: str) -> int | None:
        """Bytes free to an unprivileged user on the file system of `path` (statvfs@openssh.com), or None."""
        if "statvfs@openssh.com" not in self.extensions:
            return None
        reply = self._call(_string("statvfs@openssh.com") + _string(path), EXTENDED, path)
        if reply.type != EXTENDED_REPLY:
            return None
        _bsize, frsize, _blocks, _bfree, bavail = (reply.buf.u64() for _ in range(5))
        return frsize * bavail

    def _open(self, path: str, flags: int) -> bytes:
        reply = self._call(_string(path) + _U32.pack(flags) + NO_ATTRS, OPEN, path)
        return _handle(reply, path)

    def _close(self, handle: bytes, path: str) -> None:
        _status(self._call(_string(handle), CLOSE, path), path)

    @_guarded
    def listdir(self, path: str) -> list[Name]:
        handle = _handle(self._call(_string(path), OPENDIR, path), path)
        names: list[Name] = []
        try:
            while True:
                reply = self._reply(self._request(_string(handle), READDIR))
                if reply.type == STATUS and _status_code(reply) == EOF:
                    return names
                _check(reply, path)
                if reply.type != NAME:
                    raise ProtocolError(f"SFTP READDIR answered with message type {reply.type}")
                for _ in range(reply.buf.u32()):
                    name = reply.buf.text()
                    reply.buf.string()  # the long name (ls -l style): not used
                    names.append(Name(name, reply.buf.attrs()))
        finally:
            if self._outstanding == 0:  # else the session is out of step and will be thrown away
                self._close(handle, path)

    @_guarded
    def write_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """Create or truncate `path` and write `data` with up to IN_FLIGHT requests outstanding; every
        WRITE must be acknowledged OK, and the size the server then reports must be len(data): only then
        does it return (the caller renames the file into place)."""
        view = memoryview(data).cast("B")
        handle = self._open(path, F_WRITE | F_CREAT | F_TRUNC)
        prefix = _string(handle)
        pending: list[int] = []
        failure: OSError | None = None
        for offset in range(0, len(view), self.max_write):
            if len(pending) >= IN_FLIGHT:
                error = _ack(self._reply(pending.pop(0)), path)
                failure = failure or error
            if failure is None:  # after a refused write, send no more (the file will not be used)
                chunk = view[offset:offset + self.max_write]
                pending.append(self._request(prefix + struct.pack(">Q", offset), WRITE, chunk))
        for rid in pending:  # every reply is read, also after an error: the session stays in step
            error = _ack(self._reply(rid), path)
            failure = failure or error
        size = _attrs(self._call(prefix, FSTAT, path), path).size
        try:
            self._close(handle, path)
        except OSError as exc:
            failure = failure or exc
        if failure is not None:
            raise failure
        if size is not None and size != len(view):
            raise OSError(errno.ENOSPC, f"the server kept {size} of {len(view)} bytes", path)

    @_guarded
    def read_file(self, path: str, limit: int = MAX_FILE) -> bytes:
        """The whole file, as big as it is when opened: READs of max_read bytes, IN_FLIGHT outstanding,
        each reply read straight into its place; a short reply gets a follow-up request for the rest.
        A size above `limit` is FileTooLarge before anything is allocated; nothing beyond the size the
        server stated is asked for (a file that grew is cut there: its content then fails its checks)."""
        open_rid = self._request(_string(path) + _U32.pack(F_READ) + NO_ATTRS, OPEN)
        stat_rid = self._request(_string(path), STAT)
        opened = self._reply(open_rid)
        attrs = self._reply(stat_rid)
        handle = _handle(_check(opened, path), path)
        try:
            size = _attrs(_check(attrs, path), path).size
            if size is None:
                raise ProtocolError("the server did not say how big the file is")
            if size > min(limit, MAX_FILE):
                raise FileTooLarge(size, path)
            out = bytearray(size)
            view = memoryview(out)
            prefix = _string(handle)
            todo = [(offset, min(self.max_read, size - offset)) for offset in range(0, size, self.max_read)]
            todo.reverse()
            pending: list[tuple[int, int, int]] = []
            while todo or pending:
                while todo and len(pending) < IN_FLIGHT:
                    offset, length = todo.pop()
                    pending.append((self._request(prefix + _READ.pack(offset, length), READ), offset, length))
                rid, offset, length = pending.pop(0)
                reply = self._reply(rid, into=view[offset:offset + length])
                if reply.type != DATA:
                    if reply.type == STATUS and _status_code(reply) == EOF:
                        raise OSError(errno.EIO, f"the file ended at {offset} of {size} bytes", path)
                    _check(reply, path)
                    raise ProtocolError(f"SFTP READ answered with message type {reply.type}")
                if reply.size == 0:
                    raise ProtocolError("SFTP READ answered with no data and no end of file")
                if reply.size < length:
                    todo.append((offset + reply.size, length - reply.size))
            return bytes(out)
        finally:
            if self._outstanding == 0:
                self._close(handle, path)

    # -- end
    def alive(self) -> bool:
        """ssh still runs, and no request of an operation that failed midway is still unanswered."""
        return not self._broken and self._outstanding == 0 and self.proc.poll() is None

    def close(self) -> None:
        """End ssh: EOF on its stdin ends the session cleanly; a child that lingers is killed."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()


@dataclass
class _Reply:
    type: int
    buf: _Buf
    size: int  # DATA read into the caller's buffer: its length


def _status_code(reply: _Reply) -> int:
    return _Buf(reply.buf.data).u32()


def _check(reply: _Reply, path: str) -> _Reply:
    """The reply unless it is a STATUS other than OK (then the matching OSError is raised)."""
    if reply.type == STATUS:
        buf = _Buf(reply.buf.data)
        code = buf.u32()
        if code != OK:
            message = buf.text() if len(buf.data) >= 8 else ""
            raise _status_error(code, message[:200], path)
    return reply


def _ack(reply: _Reply, path: str) -> OSError | None:
    """The error a WRITE's reply reports (None for OK), without raising: the other replies must be read."""
    try:
        _status(_check(reply, path), path)
    except OSError as exc:
        return exc
    return None


def _status(reply: _Reply, path: str) -> None:
    if reply.type != STATUS:
        raise ProtocolError(f"SFTP status expected for {path}, got message type {reply.type}")


def _attrs(reply: _Reply, path: str) -> Attrs:
    if reply.type != ATTRS:
        raise ProtocolError(f"SFTP attributes expected for {path}, got message type {reply.type}")
    return reply.buf.attrs()


def _handle(reply: _Reply, path: str) -> bytes:
    if reply.type != HANDLE:
        raise ProtocolError(f"SFTP handle expected for {path}, got message type {reply.type}")
    handle = reply.buf.string()
    if not 0 < len(handle) <= 256:
        raise ProtocolError(f"SFTP handle of {len(handle)} bytes")
    return handle

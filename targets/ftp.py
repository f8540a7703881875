"""ftp:// and ftps:// targets, through ftplib (fsspec's FTPFileSystem holds each connection).

    ftp://user@host[:port]/path      password from password_env or password_secret
    ftps://user@host[:port]/path     the same over explicit TLS (AUTH TLS, then PROT P for data); the server's
                                     certificate is verified (options: ca_file: PATH, verify: false)

The path is as the server shows it to that user (with a chroot, relative to the user's home).
An FTP connection carries one transfer at a time, so each thread leases its own from a small pool (export's
workers: one control connection each, several chunks in flight). A blob is stored with one STOR under a
temporary name (one sendall of the whole blob) and renamed with RNFR and RNTO sent together (one round trip;
a server that does not take them pipelined is asked one at a time from then on); a server that refuses to
rename over an existing file gets DELE + rename. Per chunk that is PASV, STOR, RNFR+RNTO, and MLST only where
the chunk may already be there (exists_for_write, grouped()). A pooled connection the server dropped (a
restart, an idle timeout) is replaced and the operation run again (_call): every operation here can be
repeated, a STOR under its temporary name included.
Servers differ (docs/targets.md has the table for pyftpdlib and vsftpd, both tested): without MLST/MLSD
(vsftpd) existence is SIZE then CWD and the chunk directories come from one LIST; FTPS data connections
resume the control connection's TLS session (vsftpd requires it); a 421 "too many connections" caps the
connections at those open (vsftpd's max_per_ip).
fsspec's own FTP writes re-STOR every 64 KiB block and its listings are cached per connection, so those paths
are done here with plain commands.
"""

from __future__ import annotations

import ftplib
import posixpath
import re
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from fsspec.implementations.ftp import FTPFileSystem

from hotvm import credentials
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError, TargetError
from targets.base import DEFAULT_LIMIT, Pool, Target, is_unreachable, read_upto

BLOCK = 1024 * 1024
R = TypeVar("R")
_DROPPED = (EOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLError)
"""What a pooled connection the server closed meanwhile raises on its next use (ftplib: EOFError; over TLS
also an SSLError: a vsftpd session process that outlives its killed partner writes "500 OOPS: ..." in
plain text into the TLS stream, read as "wrong version number")."""


class _TypeKept:
    """ftplib's storbinary/retrbinary send TYPE I before every transfer: one more round trip per chunk
    (7 -> 6 for a write). The connection remembers the type it last set instead; listings (MLSD, NLST) switch
    it to ASCII, and the next transfer switches back."""

    transfer_type: str | None = None

    def voidcmd(self, cmd: str) -> str:
        response = super().voidcmd(cmd)  # type: ignore[misc]
        self._note(cmd)
        return response

    def sendcmd(self, cmd: str) -> str:
        response = super().sendcmd(cmd)  # type: ignore[misc]
        self._note(cmd)
        return response

    def _note(self, cmd: str) -> None:
        if cmd[:5].upper() == "TYPE ":
            self.transfer_type = cmd[5:].strip().upper()

    def binary(self) -> None:
        if self.transfer_type != "I":
            self.voidcmd("TYPE I")


class _FTP(_TypeKept, ftplib.FTP):
    pass


class _FTPS(_TypeKept, ftplib.FTP_TLS):
    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[Any, int | None]:
        """FTP_TLS's, resuming the control connection's TLS session on each data connection (ftplib starts
        a new one): vsftpd by default (require_ssl_reuse=YES), and other servers configured alike, refuse a
        data connection that does not with "522 SSL connection failed: session reuse required" (the
        proof that the data connection comes from the logged-in client). It also saves a full handshake
        per chunk."""
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def _store(ftp: _FTP | _FTPS, cmd: str, data: bytes) -> None:
    """storbinary without its TYPE I and its 1 MiB copies of the blob (BytesIO reads): one sendall.

    A server that cannot write the file ends the data connection early and says why on the control
    connection (vsftpd: "451 Failure writing to local file.", a full disk). That reply is the error, not the
    broken data connection (over TLS: "EOF occurred in violation of protocol", which read as "cannot
    reach"), and reading it keeps the control connection's replies in step."""
    ftp.binary()
    conn = ftp.transfercmd(cmd)  # failing here, nothing was sent: no reply to wait for
    sent = False
    try:
        with conn:
            conn.sendall(memoryview(data))
            sent = True
            if isinstance(conn, ssl.SSLSocket):
                conn.unwrap()  # a TLS close_notify, so the server knows the data is complete (as storbinary)
    except OSError as exc:  # ssl.SSLError, a reset or broken pipe of the data connection
        try:
            ftp.voidresp()
        except ftplib.Error as reply:
            raise reply from exc
        if not sent:
            raise
        return  # every byte sent and the server says stored: only the TLS shutdown failed
    ftp.voidresp()


class _TooLarge(Exception):
    def __init__(self, size: int | None) -> None:
        self.size = size


def _retrieve(ftp: _FTP | _FTPS, cmd: str, limit: int) -> bytes:
    """retrbinary without its TYPE I, joined once (a BytesIO copied every block, and again at the end).
    More than `limit` bytes (the size in the server's 150 reply, or what it sends): _TooLarge, the data
    connection closed unread (the control connection is then discarded by the pool)."""
    ftp.binary()
    conn, size = ftp.ntransfercmd(cmd)
    with conn:
        if size is not None and size > limit:
            raise _TooLarge(size)
        data = read_upto(conn.recv, limit + 1, BLOCK)
        if len(data) > limit:
            raise _TooLarge(None)
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()
    ftp.voidresp()
    return data


class _FTPFS(FTPFileSystem):
    """One logged-in connection; TLS with a verifying context (fsspec's FTP_TLS would not verify)."""

    cachable = False  # one instance per connection, always (FTPFileSystem says so too)
    used = False  # leased before: the server may have dropped it since

    def __init__(self, host: str, port: int, username: str, password: str, timeout: float,
                 context: ssl.SSLContext | None, passive: bool) -> None:
        self._context, self._passive = context, passive
        super().__init__(host, port=port, username=username, password=password, timeout=timeout,
                         tls=False, use_listings_cache=False)

    def _connect(self) -> None:
        if self._context is not None:
            self.ftp = _FTPS(context=self._context, timeout=self.timeout, encoding=self.encoding)
        else:
            self.ftp = _FTP(timeout=self.timeout, encoding=self.encoding)
        try:
            self.ftp.connect(self.host, self.port)
            if self._context is not None:
                try:
                    self.ftp.auth()
                except ftplib.error_perm as exc:
                    raise _NoTLS(*exc.args) from None
            try:
                self.ftp.login(*self.cred)
            except (ftplib.error_perm, ftplib.error_temp) as exc:  # pure-ftpd says it with 421
                if self._context is None and _ASKS_FOR_TLS.search(str(exc)):
                    raise _NeedsTLS(*exc.args) from None
                raise
            if self._context is not None:
                self.ftp.prot_p()
            self.ftp.set_pasv(self._passive)
            self.ftp.voidcmd("TYPE I")
        except BaseException:
            self.ftp.close()
            raise

    def __del__(self) -> None:
        ftp = getattr(self, "ftp", None)
        if ftp is not None:
            ftp.close()


def _unix_list_dirs(lines: list[str]) -> list[str]:
    """The directory names in a LIST reply in `ls -l` form (vsftpd, proftpd, pure-ftpd: servers without
    MLSD), e.g. `drwx------    2 1001 1001 4096 Dec 06 23:00 ab`. Lines of any other form are skipped: a
    directory not learnt here is made (MKD) as before, so a server with another format only costs time."""
    names = []
    for line in lines:
        parts = line.split(None, 8)
        if len(parts) == 9 and line[:1] == "d" and parts[8] not in (".", "..") and "/" not in parts[8]:
            names.append(parts[8])
    return names


class _NoTLS(ftplib.error_perm):
    """AUTH TLS refused. vsftpd without ssl_enable answers it "530 Please login with USER and PASS.", which
    read as a wrong password."""


class _NeedsTLS(ftplib.error_perm):
    """A plain login refused for want of TLS (vsftpd's force_local_logins_ssl: "530 Non-anonymous sessions
    must use encryption."; proftpd "550 SSL/TLS required on the control channel"; pure-ftpd "421-Sorry,
    cleartext sessions and weak ciphers are not accepted"), which read as a wrong password (or, for 421, as
    "cannot reach")."""


_ASKS_FOR_TLS = re.compile(r"encrypt|tls|ssl|secure|cleartext", re.IGNORECASE)


def _code(exc: BaseException) -> str:
    return str(exc)[:3]


class _Slots:
    """How many operations (so connections: one each) may run at once: any number until the server refuses a
    connection with 421 "too many connections" while others are open (vsftpd's max_per_ip, max_clients),
    then as many as were open then."""

    def __init__(self) -> None:
        self._cap: int | None = None
        self._busy = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._cond:
            while self._cap is not None and self._busy >= self._cap:
                self._cond.wait()
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify()

    def refused(self) -> bool:
        """Called (its slot given back) by one whose new connection was refused: False when no other is
        open (then the limit is not the reason), else the cap becomes the number of the others."""
        with self._cond:
            if self._busy < 1:
                return False
            self._cap = self._busy if self._cap is None else min(self._cap, self._busy)
            return True


class FTPTarget(Target):
    scheme = "ftp"

    def __init__(self, config: TargetConfig, host: str, port: int, user: str, cred: credentials.Credential,
                 root: str, tls: bool) -> None:
        super().__init__(config.name, config.url, None, root)
        self.host, self.port, self.user, self.cred, self.tls = host, port, user, cred, tls
        opts = dict(config.options)
        self.timeout = float(opts.pop("timeout", 30))
        passive = bool(opts.pop("passive", True))
        context = None
        if tls:
            ca_file = opts.pop("ca_file", None)
            try:
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                raise ConfigError(f"target '{config.name}': cannot read ca_file {ca_file} ({reason})",
                                  "name the PEM file of the CA that signed the server's certificate",
                                  ) from None
            if not opts.pop("verify", True):
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        if opts:
            raise ConfigError(
                f"target '{config.name}': unknown {self.scheme} option(s): {', '.join(sorted(opts))}",
                "ftp targets take: timeout, passive; ftps also ca_file, verify")
        self._pool: Pool[_FTPFS] = Pool(
            lambda: _FTPFS(host, port, user, cred.value or "", self.timeout, context, passive),
            lambda fs: fs.ftp.close(), keep_on=(FileNotFoundError, ftplib.error_perm),
            alive=lambda fs: fs.ftp.voidcmd("NOOP") is not None, check_after_s=1.0)
        self._slots = _Slots()
        self._dirs: set[str] = set()
        """Directories known to exist (made or seen by this target): no MKD for them."""
        self._fresh: set[str] = set()
        """Directories this target made (MKD succeeded) inside grouped(): they held nothing then."""
        self._fresh_written: set[int] = set()
        """hash() of the blobs written into them since (a collision only costs an MLST: 1 TiB is 16 MB)."""
        self._grouping = 0
        self._lock = threading.Lock()
        self._mlst = True
        self._mlsd = True
        self._pipeline = True

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @contextmanager
    def _session(self) -> Iterator[Any]:
        with self._slots.hold(), self._pool.lease() as fs:
            fs.used = True
            yield fs.ftp

    def _call(self, fn: Callable[[Any], R]) -> R:
        """fn(ftp) on a pooled connection, again on another if that one turns out dropped by the server
        (restarted, idle timeout; the pool's NOOP probe only runs after 1 s idle). The other idle
        connections of before the drop are closed with it, so the next one is new (or was just used). A new
        connection failing is an answer, not a reason to try again, except a 421 "too many connections"
        while others are open: then those are the server's limit (_Slots.refused), and this waits for one."""
        for attempt in range(3):
            reused = False
            try:
                with self._slots.hold(), self._pool.lease() as fs:
                    reused, fs.used = fs.used, True
                    return fn(fs.ftp)
            except (*_DROPPED, ftplib.error_temp) as exc:
                # 421: the server is closing this connection (shutting down, idle timeout), or refuses one
                # more (vsftpd's max_per_ip, max_clients)
                is_421 = isinstance(exc, ftplib.error_temp) and _code(exc) == "421"
                if not reused and is_421 and self._slots.refused():
                    continue
                if not reused or attempt == 2 or (isinstance(exc, ftplib.error_temp) and not is_421):
                    raise
                self._pool.close()  # the idle ones: they went with the same server
        raise AssertionError("unreachable")

    def connect(self) -> None:
        with self._errors("connecting to", ""), self._session():
            pass

    # -- errors
    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        code = _code(exc)
        if isinstance(exc, _NoTLS) or (isinstance(exc, ftplib.error_perm) and code in ("500", "502", "504")
                                       and self.tls):
            return TargetConfigError(f"target '{self.name}': {self.where} does not speak FTPS ({exc})",
                                     "use an ftp:// URL, or enable TLS on the server "
                                     "(vsftpd: ssl_enable=YES)")
        if isinstance(exc, _NeedsTLS):
            return TargetConfigError(f"target '{self.name}': {self.where} requires TLS ({exc})",
                                     f"use an ftps:// URL for target '{self.name}'")
        if isinstance(exc, ftplib.error_perm) and code in ("530", "331", "332"):
            return TargetConfigError(
                f"target '{self.name}': {self.where} rejected user '{self.user}' and the password from "
                f"{self.cred.source}",
                f"check the user in the URL and the password in {self.cred.source}",
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TargetConfigError(
                f"target '{self.name}': the TLS certificate of {self.where} is not trusted "
                f"({exc.verify_message})",
                "name the CA that signed it in options: {ca_file: /path/ca.pem} (verify: false: tests only)",
            )
        if isinstance(exc, (ftplib.error_perm, ftplib.error_temp)) and code in ("452", "552"):
            return self.full_error(what, path)
        if isinstance(exc, ftplib.error_perm) and code in ("550", "553", "532", "450"):
            return self.refused_error(what, path, str(exc))
        if isinstance(exc, ftplib.error_temp) and code in ("426", "451"):
            return TargetError(
                f"target '{self.name}': {self.where} aborted {what} {self.display(path)} ({exc})",
                "its disk may be full: check free space and the FTP server's log",
            )
        if isinstance(exc, (ftplib.error_temp, EOFError, ssl.SSLError)) or is_unreachable(exc):
            return self.unreachable_error(exc)
        if isinstance(exc, ftplib.Error):
            return TargetError(f"target '{self.name}' failed {what} {self.display(path)}: {exc}",
                               "check the FTP server's log")
        return super()._translate(exc, what, path)

    # -- primitives on one connection
    def _stat_exists(self, ftp: ftplib.FTP, full: str) -> bool:
        if self._mlst:
            try:
                ftp.sendcmd(f"MLST {full}")
                return True
            except ftplib.error_perm as exc:
                if _code(exc) == "550":
                    return False
                if _code(exc) not in ("500", "501", "502", "504"):
                    raise
                self._mlst = False
        ftp.binary()  # servers refuse SIZE in ASCII mode (a listing switched to it)
        try:
            ftp.size(full)
            return True
        except ftplib.error_perm as exc:
            if _code(exc) in ("500", "502"):  # no SIZE either: the directory's listing
                try:
                    return posixpath.basename(full) in self._names(ftp, posixpath.dirname(full))
                except FileNotFoundError:
                    return False
        # 550 for a missing name and for a directory alike (vsftpd): a CWD tells them apart, one round trip
        # where a listing of a chunk directory (a data connection, thousands of names) was asked every time
        return self._is_dir(ftp, full)

    def _names(self, ftp: ftplib.FTP, full: str) -> list[str]:
        try:
            if self._mlsd:
                try:
                    return [n for n, facts in ftp.mlsd(full, facts=["type"]) if facts.get("type") not in
                            ("cdir", "pdir") and n not in (".", "..")]
                except ftplib.error_perm as exc:
                    if _code(exc) not in ("500", "501", "502", "504"):
                        raise
                    self._mlsd = False  # vsftpd has no MLSD (nor MLST): NLST from now on
            return [posixpath.basename(n.rstrip("/")) for n in ftp.nlst(full) if n not in (".", "..")]
        except ftplib.error_perm as exc:
            if _code(exc) == "550":
                raise FileNotFoundError(2, "No such directory", full) from None
            raise

    def _is_dir(self, ftp: ftplib.FTP, full: str) -> bool:
        try:
            ftp.cwd(full)
            return True
        except ftplib.error_perm:
            return False

    # -- operations
    def exists(self, path: str) -> bool:
        with self._errors("checking", path):
            return self._call(lambda ftp: self._stat_exists(ftp, self.full(path)))

    def exists_for_write(self, path: str) -> bool:
        """No MLST for a blob whose directory this export made (MKD succeeded inside grouped()): nothing
        was in it then, and what this target wrote there since is asked for as usual. Another backup
        storing the same chunk there meanwhile costs at most a second, identical write."""
        full = self.full(path)
        with self._lock:
            surely_new = posixpath.dirname(full) in self._fresh and hash(full) not in self._fresh_written
        return False if surely_new else self.exists(path)

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> bytes:
        full = self.full(path)

        def read(ftp: _FTP | _FTPS) -> bytes:
            try:
                return _retrieve(ftp, f"RETR {full}", limit)
            except _TooLarge as exc:
                raise self.too_large(path, limit, exc.size) from None
            except ftplib.error_perm as exc:
                if _code(exc) == "550" and not self._stat_exists(ftp, full):
                    raise FileNotFoundError(2, "No such file", self.display(path)) from None
                raise

        with self._errors("reading", path):
            return self._call(read)

    def write_bytes(self, path: str, data: bytes) -> None:
        """STOR under a temporary name, then RNFR+RNTO: a blob appears whole under its name or not at all."""
        final = self.full(path)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"

        def write(ftp: _FTP | _FTPS) -> None:
            try:
                _store(ftp, f"STOR {tmp}", data)
                self._rename(ftp, tmp, final)
            except BaseException:
                with suppress(Exception):  # best-effort cleanup: the original error matters
                    self._remove(ftp, tmp)
                raise

        with self._errors("writing", path):
            self._makedirs(posixpath.dirname(final))
            self._call(write)
        with self._lock:
            if posixpath.dirname(final) in self._fresh:
                self._fresh_written.add(hash(final))

    @contextmanager
    def grouped(self, under: str) -> Iterator[None]:
        """Export's chunks: the directories under `under` are listed once (instead of MKD, or MKD + CWD,
        for each directory in each run), and those made inside the block count as fresh (exists_for_write)
        until the outermost block ends. Blobs are durable once written: nothing else to group."""
        with self._lock:
            first = not self._grouping
            self._grouping += 1
        if first:
            self._learn_dirs(under)
        try:
            yield
        finally:
            with self._lock:
                self._grouping -= 1
                if not self._grouping:
                    self._fresh.clear()
                    self._fresh_written.clear()

    def _learn_dirs(self, under: str) -> None:
        full = self.full(under.rstrip("/"))

        def dirs(ftp: _FTP | _FTPS) -> tuple[list[str], bool]:
            """The directories in `full`, and whether `full` surely exists (MLSD says so; vsftpd's LIST of
            a missing directory is an empty success)."""
            if self._mlsd:
                try:
                    return [n for n, facts in ftp.mlsd(full, facts=["type"]) if facts.get("type") == "dir"
                            and "/" not in n and n not in (".", "..")], True
                except ftplib.error_perm as exc:
                    if _code(exc) not in ("500", "501", "502", "504"):
                        raise
                    self._mlsd = False
            lines: list[str] = []
            ftp.retrlines(f"LIST {full}", lines.append)
            names = _unix_list_dirs(lines)
            return names, bool(names)

        try:
            found, there = self._call(dirs)
        except (ftplib.Error, OSError, EOFError):
            return  # no such directory yet, or no server: directories are made as before
        with self._lock:
            self._dirs.update(posixpath.join(full, n) for n in found)
            if there:
                self._dirs.add(full)

    def _put(self, ftp: _FTP | _FTPS, full_path: str, data: bytes) -> None:
        _store(ftp, f"STOR {full_path}", data)

    def _rename(self, ftp: ftplib.FTP, src: str, dst: str) -> None:
        try:
            self._rnfr_rnto(ftp, src, dst)
        except ftplib.error_perm:
            if not self._stat_exists(ftp, dst):
                raise
            ftp.delete(dst)  # a server that will not rename over a file (IIS, some NAS)
            self._rnfr_rnto(ftp, src, dst)

    def _rnfr_rnto(self, ftp: ftplib.FTP, src: str, dst: str) -> None:
        """RNFR and RNTO in one send, then both replies: one round trip instead of two. A server that
        does not take the pipelined RNTO (503 after RNFR's 350) gets them one at a time from then on."""
        if not self._pipeline:
            ftp.rename(src, dst)
            return
        for line in (src, dst):
            if "\r" in line or "\n" in line:
                raise ValueError("an illegal newline character should not be contained")
        ftp.sock.sendall(f"RNFR {src}\r\nRNTO {dst}\r\n".encode(ftp.encoding))
        first: ftplib.Error | None = None
        try:
            reply = ftp.getresp()
            if reply[:1] != "3":
                raise ftplib.error_reply(reply)
        except ftplib.Error as exc:
            first = exc
        try:
            ftp.voidresp()
        except ftplib.Error as exc:
            if first is None and isinstance(exc, ftplib.error_perm) and _code(exc) == "503":
                self._pipeline = False
                ftp.rename(src, dst)
                return
            raise (first or exc) from None
        if first is not None:
            raise first

    def _remove(self, ftp: ftplib.FTP, full_path: str) -> None:
        try:
            ftp.delete(full_path)
        except ftplib.error_perm as exc:
            if _code(exc) == "550" and not self._stat_exists(ftp, full_path):
                raise FileNotFoundError(2, "No such file", full_path) from None
            raise

    def delete(self, path: str) -> None:
        with self._errors("deleting", path), suppress(FileNotFoundError):
            self._call(lambda ftp: self._remove(ftp, self.full(path)))

    def _makedirs(self, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/"):
            return
        self._call(lambda ftp: self._mkdirs(ftp, full_path))

    def _mkdirs(self, ftp: ftplib.FTP, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/"):
            return
        try:
            ftp.mkd(full_path)
        except ftplib.error_perm:
            if not self._is_dir(ftp, full_path):
                parent = posixpath.dirname(full_path)
                if parent not in self._dirs and not self._is_dir(ftp, parent):
                    self._mkdirs(ftp, parent)
                try:  # again: the parent is there now (made here, or by another thread meanwhile)
                    ftp.mkd(full_path)
                except ftplib.error_perm:
                    if not self._is_dir(ftp, full_path):
                        raise  # the parent is there, yet MKD fails: permissions
                    self._dirs.add(full_path)
                    return
            else:
                self._dirs.add(full_path)  # there already (from before, or another writer's): not fresh
                return
        with self._lock:
            self._dirs.add(full_path)
            if self._grouping:
                self._fresh.add(full_path)

    def listdir(self, path: str) -> list[str]:
        def names(ftp: _FTP | _FTPS) -> list[str]:
            try:
                return sorted(self._names(ftp, self.full(path)))
            except FileNotFoundError:
                return []

        with self._errors("listing", path):
            return self._call(names)

    def delete_tree(self, path: str) -> None:
        full = self.full(path)
        with self._lock:
            inside = {d for d in self._dirs | self._fresh
                      if d == full or d.startswith(full.rstrip("/") + "/")}
            self._dirs -= inside
            self._fresh -= inside
        with self._errors("deleting", path), suppress(FileNotFoundError):
            self._call(lambda ftp: self._rmtree(ftp, full))

    def _rmtree(self, ftp: ftplib.FTP, full: str) -> None:
        if not self._is_dir(ftp, full):
            self._remove(ftp, full)
            return
        try:
            entries = [(n, f.get("type")) for n, f in ftp.mlsd(full, facts=["type"])]
        except ftplib.error_perm:
            entries = [(n, None) for n in self._names(ftp, full)]
        for name, kind in entries:
            if kind in ("cdir", "pdir") or name in (".", ".."):
                continue
            child = posixpath.join(full, name)
            if kind == "dir" or (kind is None and self._is_dir(ftp, child)):
                self._rmtree(ftp, child)
            else:
                ftp.delete(child)
        ftp.cwd("/")
        ftp.rmd(full)

    def close(self) -> None:
        self._pool.close()


class FTPSTarget(FTPTarget):
    scheme = "ftps"


def open_ftp(config: TargetConfig) -> FTPTarget:
    parts = urlsplit(config.url)
    tls = parts.scheme == "ftps"
    if not parts.hostname:
        raise ConfigError(f"target '{config.name}': {parts.scheme} URL needs a host: {parts.geturl()}",
                          f"write it as {parts.scheme}://user@host[:port]/path")
    user = unquote(parts.username) if parts.username else "anonymous"
    cred = credentials.password(config)
    root = unquote(parts.path) or "/"
    cls = FTPSTarget if tls else FTPTarget
    target = cls(config, parts.hostname, parts.port or 21, user, cred, root, tls)
    target.connect()
    return target

"""ftp:// and ftps:// targets, through ftplib (fsspec's FTPFileSystem holds each connection).

    ftp://user@host[:port]/path      password from password_env or password_secret
    ftps://user@host[:port]/path     the same over explicit TLS (AUTH TLS, then PROT P for data); the server's
                                     certificate is verified (options: ca_file: PATH, verify: false)

The path is as the server shows it to that user (with a chroot, relative to the user's home).
An FTP connection carries one transfer at a time, so each thread leases its own from a small pool. A blob is
stored with one STOR under a temporary name and renamed with RNFR/RNTO; a server that refuses to rename over
an existing file gets DELE + rename. fsspec's own FTP writes re-STOR every 64 KiB block and its listings are
cached per connection, so those paths are done here with plain commands.
"""

from __future__ import annotations

import ftplib
import posixpath
import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import unquote, urlsplit

from fsspec.implementations.ftp import FTPFileSystem

from hotvm import credentials
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError, TargetError
from targets.base import Pool, Target, is_unreachable

BLOCK = 1024 * 1024


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
    pass


def _store(ftp: _FTP | _FTPS, cmd: str, data: bytes) -> None:
    """storbinary without its TYPE I and its 1 MiB copies of the blob (BytesIO reads): one sendall."""
    ftp.binary()
    with ftp.transfercmd(cmd) as conn:
        conn.sendall(memoryview(data))
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()  # a TLS close_notify, so the server knows the data is complete (as storbinary)
    ftp.voidresp()


def _retrieve(ftp: _FTP | _FTPS, cmd: str) -> bytes:
    """retrbinary without its TYPE I, joined once (a BytesIO copied every block, and again at the end)."""
    ftp.binary()
    pieces = []
    with ftp.transfercmd(cmd) as conn:
        while piece := conn.recv(BLOCK):
            pieces.append(piece)
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()
    ftp.voidresp()
    return b"".join(pieces)


class _FTPFS(FTPFileSystem):
    """One logged-in connection; TLS with a verifying context (fsspec's FTP_TLS would not verify)."""

    cachable = False  # one instance per connection, always (FTPFileSystem says so too)

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
            self.ftp.login(*self.cred)  # FTP_TLS.login sends AUTH TLS first
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


def _code(exc: BaseException) -> str:
    return str(exc)[:3]


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
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
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
        self._dirs: set[str] = set()
        self._mlst = True

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @contextmanager
    def _session(self) -> Iterator[Any]:
        with self._pool.lease() as fs:
            yield fs.ftp

    def connect(self) -> None:
        with self._errors("connecting to", ""), self._session():
            pass

    # -- errors
    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        code = _code(exc)
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
        if isinstance(exc, ftplib.error_perm) and code in ("500", "502", "504") and self.tls:
            return TargetConfigError(f"target '{self.name}': {self.where} does not speak FTPS ({exc})",
                                     "use an ftp:// URL, or enable TLS on the server")
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
        try:
            ftp.size(full)
            return True
        except ftplib.error_perm:
            return posixpath.basename(full) in self._names(ftp, posixpath.dirname(full))

    def _names(self, ftp: ftplib.FTP, full: str) -> list[str]:
        try:
            try:
                return [n for n, facts in ftp.mlsd(full, facts=["type"]) if facts.get("type") not in
                        ("cdir", "pdir") and n not in (".", "..")]
            except ftplib.error_perm as exc:
                if _code(exc) not in ("500", "501", "502", "504"):
                    raise
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
        with self._errors("checking", path), self._session() as ftp:
            return self._stat_exists(ftp, self.full(path))

    def read_bytes(self, path: str) -> bytes:
        with self._errors("reading", path), self._session() as ftp:
            try:
                return _retrieve(ftp, f"RETR {self.full(path)}")
            except ftplib.error_perm as exc:
                if _code(exc) == "550" and not self._stat_exists(ftp, self.full(path)):
                    raise FileNotFoundError(2, "No such file", self.display(path)) from None
                raise

    def _put(self, ftp: _FTP | _FTPS, full_path: str, data: bytes) -> None:
        _store(ftp, f"STOR {full_path}", data)

    def _rename(self, ftp: ftplib.FTP, src: str, dst: str) -> None:
        try:
            ftp.rename(src, dst)
        except ftplib.error_perm:
            if not self._stat_exists(ftp, dst):
                raise
            ftp.delete(dst)  # a server that will not rename over a file (IIS, some NAS)
            ftp.rename(src, dst)

    def _remove(self, ftp: ftplib.FTP, full_path: str) -> None:
        try:
            ftp.delete(full_path)
        except ftplib.error_perm as exc:
            if _code(exc) == "550" and not self._stat_exists(ftp, full_path):
                raise FileNotFoundError(2, "No such file", full_path) from None
            raise

    def _makedirs(self, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/"):
            return
        with self._session() as ftp:
            self._mkdirs(ftp, full_path)

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

    def listdir(self, path: str) -> list[str]:
        with self._errors("listing", path), self._session() as ftp:
            try:
                return sorted(self._names(ftp, self.full(path)))
            except FileNotFoundError:
                return []

    def delete_tree(self, path: str) -> None:
        full = self.full(path)
        with self._errors("deleting", path), self._session() as ftp:
            self._dirs = {d for d in self._dirs if not (d == full or d.startswith(full.rstrip("/") + "/"))}
            with suppress(FileNotFoundError):
                self._rmtree(ftp, full)

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

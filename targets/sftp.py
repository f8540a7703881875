"""sftp:// targets: the seed's "copy over ssh to another host", through paramiko (fsspec's SFTPFileSystem).

    sftp://user@host[:port]/path    key_file:, and/or password_env / password_secret (password or passphrase)

Host keys are checked: the server's key must be in known_hosts (`known_hosts:` in the config, else
~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts); an unknown or changed key is a clear error, never accepted.
One SSH connection per target; each thread gets its own SFTP channel from a small pool (a paramiko SFTP
client must not serve two threads at once). Blobs are written pipelined under a temporary name, then renamed
with posix-rename@openssh.com (atomic replace); servers without that extension get remove + rename.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import posixpath
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paramiko
from fsspec.implementations.sftp import SFTPFileSystem

from hotvm import credentials
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError, TargetError
from targets.base import Pool, Target, is_unreachable

READ_SIZE = 64 * 1024
"""Bytes per SFTP read request: OpenSSH answers up to 255 KiB, and 64 KiB is what servers commonly accept
(a server answering less is still read whole, by paramiko's follow-up reads, only slower)."""
SYSTEM_KNOWN_HOSTS = (Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts"))


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, host: str, key: paramiko.PKey) -> None:
        digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
        super().__init__(f"host key of {host} is not in known_hosts")
        self.key_type, self.fingerprint = key.get_name(), f"SHA256:{digest}"


def _gcm_first(sock: object, **kw: object) -> paramiko.Transport:
    """A transport preferring AES-GCM: one AEAD pass per packet instead of AES-CTR plus an HMAC that paramiko
    computes in Python for every 32 KiB packet (5 % of an upload's samples in py-spy). Servers without it
    still get the usual list; nothing weaker is added."""
    transport = paramiko.Transport(sock, **kw)  # type: ignore[arg-type]
    options = transport.get_security_options()
    gcm = tuple(c for c in options.ciphers if c.endswith("-gcm@openssh.com"))
    options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)
    return transport


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise UnknownHostKey(hostname, key)


class _ChannelFS(SFTPFileSystem):
    """fsspec's SFTP filesystem on one SFTP channel of an already authenticated SSH connection.

    Never cached: fsspec would otherwise hand out one instance (one channel) per (host, client, thread id),
    and thread ids are reused, so two threads could end up reading each other's replies on one channel."""

    cachable = False

    def __init__(self, host: str, client: paramiko.SSHClient) -> None:
        self._shared_client = client
        super().__init__(host)

    def _connect(self) -> None:
        self.client = self._shared_client
        self.ftp = self.client.open_sftp()
        self.ftp.get_channel().settimeout(120)

    def __del__(self) -> None:  # the SSH connection belongs to the target, not to this channel
        pass


def _channel_alive(fs: _ChannelFS) -> bool:
    transport = fs.client.get_transport()
    return bool(transport and transport.is_active() and not fs.ftp.get_channel().closed)


def _write_size(fh: paramiko.SFTPFile) -> int:
    """The largest SFTP write whose message fits in one SSH packet of the channel.

    paramiko writes 32 KiB per request; with its header (29 bytes + the handle) that is just over the
    channel's packet limit (OpenSSH: 32 KiB, less the 64 bytes paramiko keeps back), so every write went out
    as a full packet plus a tiny one. Each packet costs about the same in paramiko: one packet per write
    uploads ~1.7x faster on one channel."""
    header = 4 + 1 + 4 + 4 + len(fh.handle) + 8 + 4  # length, type, request id, handle, offset, data length
    return max(4096, min(fh.MAX_REQUEST_SIZE, fh.sftp.sock.out_max_packet_size - 64 - header))


class SFTPTarget(Target):
    scheme = "sftp"

    def __init__(self, config: TargetConfig, host: str, port: int, user: str,
                 cred: credentials.Credential, root: str) -> None:
        super().__init__(config.name, config.url, None, root)
        self.host, self.port, self.user, self.cred = host, port, user, cred
        self.key_file = str(config.key_file) if config.key_file else None
        self.known_hosts = [Path(config.known_hosts)] if config.known_hosts else list(SYSTEM_KNOWN_HOSTS)
        opts = dict(config.options)
        self.timeout = float(opts.pop("timeout", 15))
        self.allow_agent = bool(opts.pop("allow_agent", False))
        if opts:
            raise ConfigError(f"target '{config.name}': unknown sftp option(s): {', '.join(sorted(opts))}",
                              "sftp targets take the options: timeout, allow_agent")
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._pool: Pool[_ChannelFS] = Pool(self._new_channel, lambda fs: fs.ftp.close(),
                                            keep_on=(FileNotFoundError, PermissionError, FileExistsError),
                                            alive=_channel_alive)
        self._dirs: set[str] = set()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    # -- connection
    def _ssh(self) -> paramiko.SSHClient:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client else None
            if client is None or transport is None or not transport.is_active():
                if client is not None:
                    client.close()
                self._client = None
                client = paramiko.SSHClient()
                for path in self.known_hosts:
                    if path.exists():
                        client.load_host_keys(str(path))
                client.set_missing_host_key_policy(_RejectUnknown())
                client.connect(
                    self.host, port=self.port, username=self.user, password=self.cred.value,
                    key_filename=self.key_file, allow_agent=self.allow_agent,
                    look_for_keys=self.key_file is None and self.cred.value is None,
                    timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
                    channel_timeout=self.timeout, transport_factory=_gcm_first,
                )
                self._client = client
            return client

    def _new_channel(self) -> _ChannelFS:
        return _ChannelFS(self.host, self._ssh())

    @contextmanager
    def _session(self) -> Iterator[_ChannelFS]:
        with self._pool.lease() as fs:
            yield fs

    def connect(self) -> None:
        with self._errors("connecting to", ""), self._session():
            pass

    # -- errors
    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        known = ", ".join(str(p) for p in self.known_hosts)
        if isinstance(exc, UnknownHostKey):
            keyscan = f"ssh-keyscan -p {self.port} {self.host}" if self.port != 22 else \
                f"ssh-keyscan {self.host}"
            return TargetConfigError(
                f"target '{self.name}': the host key of {self.where} ({exc.key_type} {exc.fingerprint}) "
                f"is not in known_hosts ({known})",
                f"check that fingerprint with the server's admin, then add the key: {keyscan} >> "
                f"{self.known_hosts[0]} (or point known_hosts: at a file that has it)",
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return TargetConfigError(
                f"target '{self.name}': the host key of {self.where} does NOT match known_hosts ({known}): "
                f"someone may be intercepting the connection, or the server was reinstalled",
                "verify the server's new key out of band, then replace its line in known_hosts",
            )
        if isinstance(exc, paramiko.hostkeys.InvalidHostKey):
            return TargetConfigError(
                f"target '{self.name}': a line of known_hosts ({known}) is not a valid host key",
                "fix or remove that line (the file must be in OpenSSH known_hosts format)",
            )
        if isinstance(exc, paramiko.AuthenticationException):
            how = " and ".join(x for x in (
                f"key {self.key_file}" if self.key_file else "",
                f"the password from {self.cred.source}" if self.cred.value is not None else "",
            ) if x) or "the default keys in ~/.ssh"
            return TargetConfigError(
                f"target '{self.name}': {self.where} rejected user '{self.user}' with {how}",
                "check the user in the URL, key_file and the server's authorized_keys (or the password)",
            )
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            reason = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()})) or str(exc)
            return TargetError(
                f"target '{self.name}' cannot reach {self.where} ({reason})",
                "check that the ssh server is running and that the URL's host and port are right",
            )
        if isinstance(exc, (paramiko.SSHException, EOFError)) or is_unreachable(exc):
            return self.unreachable_error(exc)
        if isinstance(exc, OSError) and exc.errno is None and str(exc).startswith("Failure"):
            # SFTP v3 has no "no space" status: OpenSSH answers a full disk with a bare "Failure"
            return TargetError(
                f"target '{self.name}' failed {what} {self.display(path)}: the server said '{exc}'",
                "the disk on the server may be full, or the path not writable: check both",
            )
        return super()._translate(exc, what, path)

    # -- operations
    def exists(self, path: str) -> bool:
        with self._errors("checking", path), self._session() as fs:
            try:
                fs.ftp.stat(self.full(path))
                return True
            except FileNotFoundError:
                return False

    def read_bytes(self, path: str) -> bytes:
        """All READ_SIZE requests sent at once (readv), each reply taken as it is and joined once.
        A single read(size) of the prefetched blob appends every 64 KiB reply to one bytes object (paramiko's
        BufferedFile.read: `_rbuffer += new_data`), copying 4 MiB blobs ~32 times: 60 % of a restore's
        client CPU in py-spy."""
        with self._errors("reading", path), self._session() as fs, fs.ftp.open(self.full(path), "rb") as fh:
            fh.MAX_REQUEST_SIZE = READ_SIZE
            size = fh.stat().st_size
            if size == 0:
                return b""
            pieces = list(fh.readv([(offset, min(READ_SIZE, size - offset))
                                    for offset in range(0, size, READ_SIZE)]))
            data = b"".join(pieces)
            if len(data) != size:  # a reply shorter than asked (paramiko's follow-up reads fill a gap)
                raise OSError(errno.EIO, f"read {len(data)} of {size} bytes", self.full(path))
            return data

    def _put(self, fs: _ChannelFS, full_path: str, data: bytes) -> None:
        with fs.ftp.open(full_path, "wb") as fh:
            fh.MAX_REQUEST_SIZE = _write_size(fh)
            fh.set_pipelined(True)
            fh.write(data)
        # Pipelined writes are not all acknowledged before close returns, and a write refused by a full disk
        # can go unreported: the file would be renamed into place cut short. Its size says.
        size = fs.ftp.stat(full_path).st_size
        if size != len(data):
            raise OSError(errno.ENOSPC, f"the server kept {size} of {len(data)} bytes", full_path)

    def _rename(self, fs: _ChannelFS, src: str, dst: str) -> None:
        try:
            fs.ftp.posix_rename(src, dst)
        except OSError as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            # no posix-rename extension: plain SFTP rename refuses to overwrite
            with suppress(FileNotFoundError):
                fs.ftp.remove(dst)
            fs.ftp.rename(src, dst)

    def _remove(self, fs: _ChannelFS, full_path: str) -> None:
        fs.ftp.remove(full_path)

    def _makedirs(self, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/"):
            return
        with self._session() as fs:
            self._mkdirs(fs, full_path)

    def _mkdirs(self, fs: _ChannelFS, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/", "."):
            return
        try:
            if not stat.S_ISDIR(fs.ftp.stat(full_path).st_mode or 0):
                raise TargetError(
                    f"target '{self.name}': {full_path} on {self.where} is a file, not a directory",
                    "point the URL at a directory")
        except FileNotFoundError:
            self._mkdirs(fs, posixpath.dirname(full_path))
            try:
                fs.ftp.mkdir(full_path)
            except OSError:
                fs.ftp.stat(full_path)  # another thread made it: fine; else raise what stat says
        self._dirs.add(full_path)

    def listdir(self, path: str) -> list[str]:
        with self._errors("listing", path), self._session() as fs:
            try:
                return sorted(fs.ftp.listdir(self.full(path)))
            except FileNotFoundError:
                return []

    def delete_tree(self, path: str) -> None:
        full = self.full(path)
        with self._errors("deleting", path), self._session() as fs:
            self._dirs = {d for d in self._dirs if not (d == full or d.startswith(full.rstrip("/") + "/"))}
            with suppress(FileNotFoundError):
                self._rmtree(fs, full)

    def _rmtree(self, fs: _ChannelFS, full: str) -> None:
        if not stat.S_ISDIR(fs.ftp.lstat(full).st_mode or 0):
            fs.ftp.remove(full)
            return
        for entry in fs.ftp.listdir_attr(full):
            child = posixpath.join(full, entry.filename)
            if stat.S_ISDIR(entry.st_mode or 0):
                self._rmtree(fs, child)
            else:
                fs.ftp.remove(child)
        fs.ftp.rmdir(full)

    def close(self) -> None:
        self._pool.close()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def open_sftp(config: TargetConfig) -> SFTPTarget:
    parts = urlsplit(config.url)
    if not parts.hostname or not parts.username:
        raise ConfigError(f"target '{config.name}': sftp URL needs a user and a host: {parts.geturl()}",
                          "write it as sftp://user@host[:port]/path")
    for what, path in (("key_file", config.key_file), ("known_hosts", config.known_hosts)):
        if path is not None and not Path(path).is_file():
            raise TargetConfigError(f"target '{config.name}': {what} {path} does not exist",
                                    f"fix the {what}: path in hotvm.yaml")
    if config.key_file is not None and not os.access(config.key_file, os.R_OK):
        raise TargetConfigError(f"target '{config.name}': key_file {config.key_file} is not readable",
                                "run hotvm as a user that can read the key")
    cred = credentials.password(config, "password or key passphrase")
    root = unquote(parts.path) or "/"
    target = SFTPTarget(config, parts.hostname, parts.port or 22, unquote(parts.username), cred, root)
    target.connect()
    return target


"""sftp:// targets: the seed's "copy over ssh to another host", through OpenSSH's own client.

    sftp://user@host[:port]/path    key_file:, and/or password_env / password_secret (password or passphrase)

Each worker thread takes an `ssh -s sftp` child from a pool (at most `connections`), and
targets/sftpwire.py speaks SFTP over its pipes (as OpenSSH's `sftp` does): the transport is OpenSSH's C, not
Python, whose per-packet work held this target to half of `sftp put`/`get` with paramiko (docs/benchmarks.md,
bench/sftp_clients.py). A child whose connection died (server restart) is noticed and replaced by the next
call.

Host keys are checked by ssh itself with StrictHostKeyChecking=yes against known_hosts (`known_hosts:` in the
config, else ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts) and never added or updated; no ssh_config file
is read (`-F none`), so nothing in ~/.ssh/config can loosen that. A password reaches ssh only through
targets/askpass.py. Blobs are written under a temporary name, every write acknowledged, then renamed with
posix-rename@openssh.com (atomic replace); servers without that extension get remove + rename.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import posixpath
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hotvm import credentials
from hotvm.child_env import child_env
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError, TargetError
from targets.askpass import Askpass
from targets.base import DEFAULT_LIMIT, Entry, Pool, Target
from targets.sftpwire import (
    FAILURE,
    MAX_FILE,
    OP_UNSUPPORTED,
    FileTooLarge,
    ProtocolError,
    Session,
    SessionClosed,
    StatusError,
)

SYSTEM_KNOWN_HOSTS = (Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts"))
IO_TIMEOUT = 120.0
"""Seconds without any progress on a request before the connection is given up (a hung server)."""
SSH = "ssh"
CONNECTIONS = 2
"""ssh connections per target at most; more threads wait for one. On loopback each connection beyond one
cost client and server CPU (4 connections: ~1.5x the CPU per GiB of one) for little wall time; two overlap
one blob's round trips (open, close, rename) with another's data, and on a link with latency two windows
carry twice what one does (bench/target_throughput.py; docs/benchmarks.md)."""
CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
"""AES-GCM first (one AES-NI pass per packet), then OpenSSH's defaults: nothing weaker is added."""


def ssh_argv(host: str, port: int, user: str, *, known_hosts: list[Path], key_file: str | None,
             password: bool, allow_agent: bool, timeout: float) -> list[str]:
    """The ssh command line of one SFTP session. Every option that decides trust is on it: no config file."""
    files = " ".join(f'"{_literal(p)}"' for p in known_hosts)
    auth = ["publickey"] + (["keyboard-interactive", "password"] if password else [])
    argv = [
        SSH, "-F", "none", "-v", "-T", "-x", "-a", "-p", str(port), "-l", user,
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={files}",
        "-o", "GlobalKnownHostsFile=none", "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no",
        "-o", f"PreferredAuthentications={','.join(auth)}", "-o", "NumberOfPasswordPrompts=1",
        "-o", f"BatchMode={'no' if password else 'yes'}",
        "-o", f"ConnectTimeout={max(1, round(timeout))}",
        "-o", "ServerAliveInterval=15", "-o", f"ServerAliveCountMax={max(1, round(IO_TIMEOUT / 15))}",
        "-o", f"Ciphers={CIPHERS}", "-o", "Compression=no", "-o", "ClearAllForwardings=yes",
        "-o", f"IdentityAgent={'SSH_AUTH_SOCK' if allow_agent else 'none'}",
    ]
    if key_file:
        argv += ["-o", "IdentitiesOnly=yes", "-i", _literal(key_file)]
    return [*argv, "-s", "--", host, "sftp"]


def _literal(path: Path | str) -> str:
    """A path as ssh reads it literally: it expands %-tokens in key and known_hosts file names."""
    return str(path).replace("%", "%%")


_FINGERPRINT = re.compile(r"Server host key: (\S+) (SHA256:\S+)")
_CONNECT = re.compile(r"connect to (?:host|address) .* port \d+: (.+)")
_RESOLVE = re.compile(r"Could not resolve hostname .*?: (.+)")
_LOAD_KEY = re.compile(r'Load key "[^"]*": (.+)')


def _said(stderr: str) -> list[str]:
    """What ssh said, without its debug lines (kept for the host key's fingerprint) and banners."""
    return [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("debug")]


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
        self.connections = opts.pop("connections", CONNECTIONS)
        if opts:
            raise ConfigError(f"target '{config.name}': unknown sftp option(s): {', '.join(sorted(opts))}",
                              "sftp targets take the options: timeout, allow_agent, connections")
        if not isinstance(self.connections, int) or isinstance(self.connections, bool) \
                or not 1 <= self.connections <= 16:
            raise ConfigError(f"target '{config.name}': sftp option connections must be from 1 to 16",
                              f"leave it out for the default ({CONNECTIONS})")
        if shutil.which(SSH) is None:
            raise TargetConfigError(f"target '{config.name}': sftp:// needs OpenSSH's ssh client, not found "
                                    "on PATH", "install it (Debian: apt-get install openssh-client)")
        self._argv = ssh_argv(host, port, user, known_hosts=self.known_hosts, key_file=self.key_file,
                              password=cred.value is not None, allow_agent=self.allow_agent,
                              timeout=self.timeout)
        self._own_secret = {config.password_env} - {None}  # withheld even before a loaded config names it
        self._askpass: Askpass | None = None
        self._lock = threading.Lock()
        self._pool: Pool[Session] = Pool(self._new_session, self._end_session,
                                         keep_on=(FileNotFoundError, PermissionError, FileExistsError,
                                                  StatusError),
                                         alive=Session.alive)
        self._dirs: set[str] = set()
        self._slots = threading.BoundedSemaphore(self.connections)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    # -- connection
    def _new_session(self) -> Session:
        env = {k: v for k, v in child_env().items() if k not in self._own_secret}
        if self.cred.value is not None:
            with self._lock:
                if self._askpass is None:
                    self._askpass = Askpass(self.cred.value)
                env.update(self._askpass.env())
        with self._askpass.lock if self._askpass is not None else nullcontext():
            session = Session(self._argv, env, IO_TIMEOUT, tempfile.TemporaryFile())  # noqa: SIM115 - it owns it
            if self._askpass is not None:
                self._askpass.allow(session.proc.pid)
        try:
            session.start(connect_timeout=self.timeout + 30)  # + key exchange, authentication
        except BaseException:
            self._end_session(session)
            raise
        finally:
            if self._askpass is not None:
                self._askpass.forget(session.proc.pid)
        return session

    def _end_session(self, session: Session) -> None:
        session.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._slots, self._pool.lease() as session:
            yield session

    def connect(self) -> None:
        with self._errors("connecting to", ""), self._session():
            pass

    # -- errors
    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        if isinstance(exc, SessionClosed):
            return self._ssh_error(exc)
        if isinstance(exc, ProtocolError):
            return TargetError(f"target '{self.name}': {self.where} broke the SFTP protocol while {what} "
                               f"{self.display(path)}: {exc}", "check the server; the connection was dropped")
        if isinstance(exc, StatusError) and exc.code == FAILURE:
            # SFTP v3 has no "no space" status: OpenSSH answers a full disk with a bare "Failure"
            return TargetError(
                f"target '{self.name}' failed {what} {self.display(path)}: the server said '{exc.strerror}'",
                "the disk on the server may be full, or the path not writable: check both",
            )
        return super()._translate(exc, what, path)

    def _ssh_error(self, exc: SessionClosed) -> TargetError:
        """One line from what ssh printed before it ended (its exit status alone says nothing)."""
        said, known = _said(exc.stderr), ", ".join(str(p) for p in self.known_hosts)
        text = "\n".join(said)
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or re.search(r"Host key for .* has changed",
                                                                             text):
            return TargetConfigError(
                f"target '{self.name}': the host key of {self.where} does NOT match known_hosts ({known}): "
                f"someone may be intercepting the connection, or the server was reinstalled",
                "verify the server's new key out of band, then replace its line in known_hosts",
            )
        if "Host key verification failed" in text or "host key is known for" in text:
            found = _FINGERPRINT.search(exc.stderr)
            key = f" ({found[1]} {found[2]})" if found else ""
            keyscan = f"ssh-keyscan -p {self.port} {self.host}" if self.port != 22 else \
                f"ssh-keyscan {self.host}"
            return TargetConfigError(
                f"target '{self.name}': the host key of {self.where}{key} is not in known_hosts ({known})",
                f"check that fingerprint with the server's admin, then add the key: {keyscan} >> "
                f"{self.known_hosts[0]} (or point known_hosts: at a file that has it)",
            )
        if "Permission denied" in text or "Too many authentication failures" in text:
            how = " and ".join(x for x in (
                f"key {self.key_file}" if self.key_file else "",
                f"the password from {self.cred.source}" if self.cred.value is not None else "",
            ) if x) or "the default keys in ~/.ssh"
            bad_key = _LOAD_KEY.search(text)
            return TargetConfigError(
                f"target '{self.name}': {self.where} rejected user '{self.user}' with {how}"
                + (f" (the key could not be used: {bad_key[1]})" if bad_key else ""),
                "check the user in the URL, key_file and the server's authorized_keys (or the password)",
            )
        if "subsystem request failed" in text:
            return TargetConfigError(f"target '{self.name}': {self.where} offers no SFTP subsystem",
                                     "enable it in the server's sshd_config (Subsystem sftp ...)")
        reason = next((m[1] for m in map(_CONNECT.search, said) if m), None) or \
            next((m[1] for m in map(_RESOLVE.search, said) if m), None)
        if reason is None:
            chatter = ("Warning:", "Authenticated", "Transferred:", "Bytes per second:")
            last = [line for line in said if not line.startswith(chatter)]
            reason = last[-1][:300] if last else "the server closed the connection"
        return TargetError(
            f"target '{self.name}' cannot reach {self.where} ({reason})",
            "check that the ssh server is running and that the URL's host and port are right",
        )

    # -- operations
    def exists(self, path: str) -> bool:
        with self._errors("checking", path), self._session() as session:
            try:
                session.stat(self.full(path))
                return True
            except FileNotFoundError:
                return False

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> bytes:
        with self._errors("reading", path), self._session() as session:
            try:
                return session.read_file(self.full(path), limit)
            except FileTooLarge as exc:
                raise self.too_large(path, min(limit, MAX_FILE), exc.size) from None

    def _put(self, session: Session, full_path: str, data: bytes) -> None:
        try:
            session.write_file(full_path, data)
        except StatusError as exc:
            if exc.code == FAILURE and self._short_of_space(session, full_path, len(data)):
                raise OSError(errno.ENOSPC, "no space left on the server", full_path) from None
            raise

    @staticmethod
    def _short_of_space(session: Session, full_path: str, size: int) -> bool:
        """After a refused write: is the server's disk what refused it? (SFTP v3 cannot say.)"""
        try:
            free = session.free_bytes(posixpath.dirname(full_path))
        except OSError:
            return False
        return free is not None and free < size

    def _rename(self, session: Session, src: str, dst: str) -> None:
        try:
            session.posix_rename(src, dst)
        except StatusError as exc:
            if exc.code != OP_UNSUPPORTED:
                raise
            # no posix-rename extension: plain SFTP rename refuses to overwrite
            with suppress(FileNotFoundError):
                session.remove(dst)
            session.rename(src, dst)

    def _remove(self, session: Session, full_path: str) -> None:
        session.remove(full_path)

    def _makedirs(self, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/"):
            return
        with self._session() as session:
            self._mkdirs(session, full_path)

    def _mkdirs(self, session: Session, full_path: str) -> None:
        if full_path in self._dirs or full_path in ("", "/", "."):
            return
        try:
            if not stat.S_ISDIR(session.stat(full_path).mode or 0):
                raise TargetError(
                    f"target '{self.name}': {full_path} on {self.where} is a file, not a directory",
                    "point the URL at a directory")
        except FileNotFoundError:
            self._mkdirs(session, posixpath.dirname(full_path))
            try:
                session.mkdir(full_path)
            except OSError:
                session.stat(full_path)  # another thread made it: fine; else raise what stat says
        self._dirs.add(full_path)

    def listdir(self, path: str) -> list[str]:
        with self._errors("listing", path), self._session() as session:
            try:
                return sorted(n.filename for n in session.listdir(self.full(path))
                              if n.filename not in (".", ".."))
            except FileNotFoundError:
                return []

    def scan(self, path: str) -> list[Entry]:
        with self._errors("listing", path), self._session() as session:
            try:
                names = session.listdir(self.full(path))
            except FileNotFoundError:
                return []
        return sorted((Entry(n.filename, stat.S_ISDIR(n.attrs.mode) if n.attrs.mode is not None else None,
                             n.attrs.size, dt.datetime.fromtimestamp(n.attrs.mtime, dt.UTC)
                             if n.attrs.mtime is not None else None)
                       for n in names if n.filename not in (".", "..")), key=lambda e: e.name)

    def delete_tree(self, path: str) -> None:
        full = self.full(path)
        with self._errors("deleting", path), self._session() as session:
            self._dirs = {d for d in self._dirs if not (d == full or d.startswith(full.rstrip("/") + "/"))}
            with suppress(FileNotFoundError):
                self._rmtree(session, full)

    def _rmtree(self, session: Session, full: str) -> None:
        if not stat.S_ISDIR(session.lstat(full).mode or 0):
            session.remove(full)
            return
        for entry in session.listdir(full):
            if entry.filename in (".", "..") or "/" in entry.filename:
                continue
            child = posixpath.join(full, entry.filename)
            if stat.S_ISDIR(entry.attrs.mode or 0):
                self._rmtree(session, child)
            else:
                session.remove(child)
        session.rmdir(full)

    def close(self) -> None:
        self._pool.close()
        with self._lock:
            if self._askpass is not None:
                self._askpass.close()
                self._askpass = None


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
    user = unquote(parts.username)
    if parts.hostname.startswith("-") or user.startswith("-") or not root.startswith("/"):
        raise ConfigError(f"target '{config.name}': sftp URL has an unusable user, host or path: "
                          f"{parts.geturl()}", "write it as sftp://user@host[:port]/absolute/path")
    target = SFTPTarget(config, parts.hostname, parts.port or 22, user, cred, root)
    try:
        target.connect()
    except BaseException:
        target.close()
        raise
    return target


"""smb:// targets: a Windows share or a NAS over SMB2/3, through smbprotocol's smbclient.

    smb://[DOMAIN;]user@host[:port]/share/path      password from password_env or password_secret

Not fsspec's SMBFileSystem: it registers sessions in smbclient's process-wide pool, where a second target with
the same user but another (wrong) password would silently reuse the first one's session. Each SMBTarget keeps
private connection caches: one connection per thread, leased from a pool. smbprotocol multiplexes threads on
one connection, but it fails a request when the server has not granted enough credits yet instead of waiting,
which export's four writers hit on a fresh connection. A connection the server dropped is noticed (its receive
thread died) and replaced on the next call. Blobs land under a temporary name and are renamed with
replace-if-exists (SMB2 SET_INFO rename).
"""

from __future__ import annotations

import posixpath
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import smbclient
import smbclient.shutil
from smbclient._io import SMBFileTransaction, SMBRawIO
from smbclient._pool import get_smb_tree
from smbprotocol import MAX_PAYLOAD_SIZE
from smbprotocol.connection import Connection
from smbprotocol.exceptions import (
    BadNetworkName,
    LogonFailure,
    SMBAuthenticationError,
    SMBException,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import NtStatus
from smbprotocol.open import (
    CreateAction,
    FilePipePrinterAccessMask,
)

from hotvm import credentials
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError, TargetError
from targets import smbblob, smbfast, smbwire
from targets.base import DEFAULT_LIMIT, Pool, Target, is_unreachable, read_upto

_Access = FilePipePrinterAccessMask
CREDIT_MARGIN = 16
"""Credits beyond one maximal request: the compounds' small CREATE/CLOSE/SET_INFO and an echo."""
_FULL = {NtStatus.STATUS_DISK_FULL, getattr(NtStatus, "STATUS_QUOTA_EXCEEDED", 0xC0000044)}
_NO_PATH = {NtStatus.STATUS_OBJECT_PATH_NOT_FOUND, NtStatus.STATUS_OBJECT_NAME_NOT_FOUND}
_MISSING = {*_NO_PATH, NtStatus.STATUS_NOT_FOUND}
_WRITE_ACCESS = _Access.FILE_WRITE_DATA | _Access.FILE_WRITE_ATTRIBUTES | _Access.DELETE
PIPELINE_DEPTH = 8
"""Chunk writes (and as many renames) of an export left unchecked at once. A writer sends its chunk and goes
on; the oldest replies, long answered by then, are checked by whichever writer is over the limit. The
connection's credits bound it too (each writer's connection holds about two 4 MiB writes)."""
_DENIED = {NtStatus.STATUS_ACCESS_DENIED, NtStatus.STATUS_PRIVILEGE_NOT_HELD,
           0xC00000A2}  # STATUS_MEDIA_WRITE_PROTECTED


def _healthy(connection: Any) -> bool:
    """smbprotocol keeps `transport.connected` True after the server went away; its receive thread knows."""
    worker = getattr(connection, "_t_worker", None)
    return bool(connection.transport.connected and getattr(connection, "_t_exc", None) is None
                and (worker is None or worker.is_alive()))


def _healthy_kw(kw: dict[str, Any]) -> bool:
    cache = kw["connection_cache"]
    return bool(cache) and all(_healthy(c) for c in list(cache.values()))


def _ask_credits(session: Any, timeout: int) -> None:
    """Ask for credits enough for the largest read or write plus a few requests (one ECHO, once).

    A request of N bytes costs N / 64 KiB credits, and smbprotocol only ever asks the server to replace the
    credits a request used, so a connection keeps what session setup granted (Samba: 64). A zstd frame of
    incompressible 4 MiB is 4 MiB + ~100 bytes: 65 credits, one more than that. Every such chunk then took
    the seven-round-trip general path for a write, and for a read a compound that came back full followed by
    reading the whole blob again."""
    connection = session.connection
    wanted = max(connection.max_write_size, connection.max_read_size) // MAX_PAYLOAD_SIZE + CREDIT_MARGIN
    available = connection.sequence_window["high"] - connection.sequence_window["low"]
    if available < wanted and connection.supports_multi_credit:
        connection.echo(sid=session.session_id, timeout=timeout, credit_request=min(wanted - available, 8192))


def _close_connection(kw: dict[str, Any]) -> None:
    for connection in list(kw["connection_cache"].values()):
        if _healthy(connection):
            smbclient.reset_connection_cache(fail_on_error=False, connection_cache=kw["connection_cache"])
        else:  # no LOGOFF over a dead socket
            with suppress(Exception):
                connection.disconnect(close=False)
    kw["connection_cache"].clear()


@dataclass
class _InFlight:
    """A chunk write sent (inside grouped(): its writer went on before the replies came)."""

    kw: dict[str, Any]
    wire: smbfast.Wire
    tmp: str
    final: str
    data: bytes | None
    """Kept until the write's reply is checked: a missing directory means sending the blob again."""
    replies: list[smbfast.Reply]
    """The write compound's, then the rename's."""
    folder: bool
    """The write compound opens-or-creates the blob's directory first."""
    file_id: bytes = b""
    renaming: bool = False


class SMBTarget(Target):
    scheme = "smb"
    makes_parents = True

    def __init__(self, config: TargetConfig, host: str, port: int, user: str | None,
                 cred: credentials.Credential, root: str) -> None:
        super().__init__(config.name, config.url, None, root)
        self.host, self.port, self.user, self.cred = host, port, user, cred
        opts = dict(config.options)
        self._kw: dict[str, Any] = {
            "port": port,
            "username": user,
            "password": cred.value,
            "connection_timeout": int(opts.pop("timeout", 15)),
        }
        if "encrypt" in opts:
            self._kw["encrypt"] = bool(opts.pop("encrypt"))
        if opts:
            raise ConfigError(f"target '{config.name}': unknown smb option(s): {', '.join(sorted(opts))}",
                              "smb targets take the options: timeout, encrypt")
        self._share = "/" + root.strip("/").split("/")[0]
        self._dirs: set[str] = set()
        """Directories known to exist (full paths): a write into one sends no directory CREATE."""
        self._fresh: set[str] = set()
        """Directories this target created inside the current grouped() block: nothing in them or below them
        can exist but what was written since (exists_for_write)."""
        self._fresh_written: set[str] = set()
        self._grouping = 0
        self._grouped_under: list[str] = []
        self._writing: deque[_InFlight] = deque()
        """Chunk writes sent whose reply is not checked yet (oldest first)."""
        self._renaming: deque[_InFlight] = deque()
        """Chunk writes whose rename is sent and not checked yet."""
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._pool: Pool[dict[str, Any]] = Pool(
            self._new_connection, _close_connection,
            keep_on=(FileNotFoundError, SMBOSError, SMBResponseException), alive=_healthy_kw)

    def _unc(self, full_path: str) -> str:
        return "\\\\" + self.host + full_path.replace("/", "\\")

    # -- connections: one per thread (see the module docstring), each in a private smbclient cache
    def _new_connection(self) -> dict[str, Any]:
        """Log on, but never wait longer than the timeout: smbprotocol waits for a session-setup reply
        without one, so a server that accepts TCP and then stays silent would hang the backup."""
        cache: dict[str, Any] = {}
        outcome: list[BaseException] = []
        done = threading.Event()

        def logon() -> None:
            try:
                # A client GUID of its own: Samba hands a new connection bearing a GUID it knows to the
                # smbd process that serves the first one (multi-channel's connection passing). smbclient
                # gives every connection of the process the same GUID, so all of a target's connections
                # shared one smbd process (one core), and about one logon in 40 that overlapped another
                # hung: the passed connection lost its NEGOTIATE's credit grant ("client used more credits
                # than granted, mid 1") and the session setup never got a reply.
                connection = Connection(uuid.uuid4(), self.host, self.port, require_signing=True)
                cache[f"{self.host.lower()}:{self.port}"] = connection
                connection.connect(timeout=self._kw["connection_timeout"])
                session = smbclient.register_session(self.host, **self._kw, connection_cache=cache)
                _ask_credits(session, self._kw["connection_timeout"])
                smbwire.verify_large_replies_in_place(session.connection)
                smbwire.receive_large_replies_in_place(session.connection)
                smbfast.install(session.connection)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                outcome.append(exc)
            finally:
                done.set()

        threading.Thread(target=logon, name=f"smb-logon-{self.host}", daemon=True).start()
        if not done.wait(self._kw["connection_timeout"] * 2):
            for conn in list(cache.values()):
                with suppress(Exception):
                    conn.disconnect(close=True)  # wakes the logon thread, which then ends
            raise ConnectionError(f"no SMB session setup reply within {self._kw['connection_timeout'] * 2} s")
        if outcome:
            raise outcome[0]
        return {**self._kw, "connection_cache": cache}

    @contextmanager
    def _session(self) -> Iterator[dict[str, Any]]:
        with self._pool.lease() as kw:
            yield kw

    # -- errors
    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        if isinstance(exc, (LogonFailure, SMBAuthenticationError)):
            return TargetConfigError(
                f"target '{self.name}': {self.where} rejected user '{self.user}' and the password from "
                f"{self.cred.source}",
                f"check the user in the URL and the password in {self.cred.source}",
            )
        if isinstance(exc, BadNetworkName):
            return self._no_share()
        status = getattr(exc, "ntstatus", None) or getattr(exc, "status", None)
        if status in _FULL:
            return self.full_error(what, path)
        if status in _DENIED:
            return self.refused_error(what, path, "access denied")
        if isinstance(exc, SMBOSError) and exc.errno == 2:
            return FileNotFoundError(2, "No such file or directory", self.display(path))
        if isinstance(exc, ValueError) and str(exc).startswith("Failed to connect"):
            return self.unreachable_error(exc.__cause__ or exc)
        if is_unreachable(exc) or isinstance(exc, SMBException) and not isinstance(exc, SMBResponseException):
            return self.unreachable_error(exc)
        if isinstance(exc, (SMBResponseException, SMBOSError)):
            return TargetError(f"target '{self.name}' failed {what} {self.display(path)}: {exc}",
                               "check the share and its permissions")
        return super()._translate(exc, what, path)

    def _no_share(self) -> TargetConfigError:
        return TargetConfigError(
            f"target '{self.name}': {self.where} has no share '{self.root.strip('/').split('/')[0]}'",
            "check the share name (the first path component of the URL)",
        )

    # -- operations
    def connect(self) -> None:
        share = "/" + self.root.strip("/").split("/")[0]
        with self._errors("connecting to", ""), self._session() as kw:
            try:
                smbclient.stat(self._unc(share), **kw)  # no such share: fail now, clearly
            except SMBOSError as exc:
                if exc.errno != 2:
                    raise
                raise self._no_share() from None

    def exists(self, path: str) -> bool:
        """One CREATE+CLOSE compound (smbclient.stat sends CREATE, five QUERY_INFOs and CLOSE, and parses them
        all in Python: 3 ms of CPU per chunk looked up), packed by smbfast where it covers the session (an
        export into an existing repository looks up every chunk it read)."""
        with self._errors("checking", path), self._session() as kw:
            wire = self._wire(kw)
            if wire is not None:  # the same compound, packed and parsed by smbfast
                timeout = self._kw["connection_timeout"]
                replies = wire.send([smbfast.lookup(self._relative(self.full(path))), smbfast.close()])
                status = [wire.wait(reply, timeout)[0] for reply in replies][0]
                if status in _MISSING:
                    return False
                if status != 0:
                    raise SMBOSError(status, self._unc(self.full(path)))
                return True
            raw = SMBRawIO(self._unc(self.full(path)), mode="r", share_access="rwd",
                           desired_access=_Access.FILE_READ_ATTRIBUTES, **kw)
            try:
                SMBFileTransaction(raw).commit()
                return True
            except SMBOSError as exc:
                if exc.errno == 2:
                    return False
                raise

    def exists_for_write(self, path: str) -> bool:
        """No round trip for a blob whose directory (or one above it) this export created: it can hold only
        what was written since, and what this target wrote there is asked for as usual. Another backup
        writing the same chunk meanwhile costs at most a second, identical write."""
        full = self.full(path)
        if full not in self._fresh_written and self._in_fresh_dir(full):
            return False
        return self.exists(path)

    def _in_fresh_dir(self, full: str) -> bool:
        folder = posixpath.dirname(full)
        while self._fresh and folder.strip("/"):
            if folder in self._fresh:
                return True
            folder = posixpath.dirname(folder)
        return False

    @contextmanager
    def grouped(self, under: str) -> Iterator[None]:
        """Chunk writes (paths under `under`) return once sent, up to PIPELINE_DEPTH of them unchecked, and
        are all checked and renamed into place when the block ends (their first error is raised there).
        Directories created inside count as fresh (exists_for_write) until the outermost block ends."""
        with self._lock:
            self._grouping += 1
            self._grouped_under.append(self.full(under))
        completed = False
        try:
            if under.endswith("/"):  # its first chunks would otherwise all find it missing, and be sent again
                with self._errors("writing", under):
                    self._makedirs(self.full(under.rstrip("/")))
            yield
            completed = True
        finally:
            try:
                self._advance(0)
            finally:
                with self._lock:
                    self._grouping -= 1
                    self._grouped_under.remove(self.full(under))
                    failure = self._failure
                    if not self._grouping:
                        self._failure = None
                        self._fresh.clear()
                        self._fresh_written.clear()
            if failure is not None and completed:
                raise failure

    def _note_dir(self, full_path: str, created: bool) -> None:
        self._dirs.add(full_path)
        if created and self._grouping:
            self._fresh.add(full_path)

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> bytes:
        """One [CREATE, READ, CLOSE] compound where the blob fits in one read (open_file + readall take three
        round trips and four copies); a read that fills the whole request may have more behind it, and takes
        the general path (which also asks the server for more credits). Never more than limit + 1 bytes are
        asked for, and a blob the server says is larger than `limit` is refused (Target.read_bytes)."""
        unc = self._unc(self.full(path))
        with self._errors("reading", path), self._session() as kw:
            raw = SMBRawIO(unc, mode="r", share_access="r", desired_access=_Access.FILE_READ_DATA, **kw)
            conn = raw.fd.connection
            available = conn.sequence_window["high"] - conn.sequence_window["low"]
            length = min(conn.max_read_size, (available - 2) * MAX_PAYLOAD_SIZE, limit + 1)
            if length > 0:
                compound = SMBFileTransaction(raw)
                raw.open(transaction=compound)
                compound += raw.fd.read(0, length, send=False)
                raw.close(transaction=compound)
                try:
                    compound.commit()
                except SMBOSError as exc:
                    if exc.ntstatus != NtStatus.STATUS_END_OF_FILE:
                        raise
                    return b""
                data = compound.results[1]
                size = raw.fd.end_of_file
                if isinstance(size, int) and size > limit:
                    raise self.too_large(path, limit, size)
                if len(self.bounded(path, data, limit)) < length:
                    return data
            with smbclient.open_file(unc, "rb", buffering=0, **kw) as fh:
                size = fh.fd.end_of_file
                if isinstance(size, int) and size > limit:
                    raise self.too_large(path, limit, size)
                return self.bounded(path, read_upto(fh.read, limit + 1), limit)

    def _put(self, kw: dict[str, Any], full_path: str, data: bytes) -> None:
        with smbclient.open_file(self._unc(full_path), "wb", buffering=0, **kw) as fh:
            view = memoryview(data)
            while view:
                view = view[fh.write(view):]

    def write_bytes(self, path: str, data: bytes) -> None:
        if self._failure is not None and self._pipelined(self.full(path)):
            raise self._failure  # an earlier chunk of this export failed: stop now, not after every chunk
        super().write_bytes(path, data)

    def _put_renamed(self, kw: dict[str, Any], tmp: str, final: str, data: bytes) -> None:
        """Two compounds per blob (targets/smbfast.py): [CREATE tmp, WRITE] then, once the reply says every
        byte was written, [SET_INFO rename over final] [CLOSE] (open_file/write/close and smbclient.replace
        took seven round trips, each some ms of smbprotocol's Python). A parent directory not known to exist
        is opened-or-created in the first compound ([CREATE dir, CLOSE] before the file's chain): a fresh
        chunk directory costs no round trip of its own; one missing after all (never made, or removed behind
        our back) is made and the write sent again. Inside grouped(), chunk writes return once sent (see
        _advance). Sessions smbfast does not cover (encrypted, DFS), and blobs larger than one write (or than
        the credits granted), take smbprotocol's path (_write_general)."""
        self._write_blob(kw, tmp, final, data, self._pipelined(final))

    def _wire(self, kw: dict[str, Any]) -> smbfast.Wire | None:
        """The fast path's view of this connection's session and share; None where it does not cover them."""
        (connection,) = kw["connection_cache"].values()
        wire = getattr(connection, "hotvm_wire", None)
        if wire is None:
            tree, _ = get_smb_tree(self._unc(self._share), **kw)
            session = tree.session
            usable = session.connection is connection and smbwire.usable(
                connection, session.session_id, tree.tree_connect_id)
            wire = smbfast.wire_for(connection, session, tree) if usable else False
            connection.hotvm_wire = wire
        return wire or None

    def _relative(self, full_path: str) -> str:
        """A path as the share sees it: below the share, with backslashes."""
        return full_path.strip("/").partition("/")[2].replace("/", "\\")

    def _write_blob(self, kw: dict[str, Any], tmp: str, final: str, data: bytes, pipelined: bool) -> None:
        parent = posixpath.dirname(final)
        wire = self._wire(kw)
        if wire is None or len(data) > wire.connection.max_write_size:
            self._write_general(kw, tmp, final, data)
            return
        conn = wire.connection
        for attempt in (1, 2):
            folder = parent not in self._dirs and parent.strip("/").count("/") >= 1  # the share is there
            need = smbblob.charge(len(data), folder)
            if pipelined:
                self._await_credits(conn, need)
            if smbblob.available(conn) < need:
                self._write_general(kw, tmp, final, data)
                return
            messages = []
            if folder:
                messages += [smbfast.create(self._relative(parent), directory=True), smbfast.close()]
            messages += [smbfast.create(self._relative(tmp)), smbfast.write(data)]
            item = _InFlight(kw, wire, tmp, final, data, wire.send(messages), folder)
            if pipelined:
                with self._lock:
                    self._writing.append(item)
                self._advance(PIPELINE_DEPTH)
                return
            try:
                self._check_write(item)
            except SMBOSError as exc:
                if attempt == 1 and exc.ntstatus in _NO_PATH:
                    self._dirs.discard(parent)
                    self._make_dirs(kw, parent)
                    continue
                raise
            self._send_rename(item)
            self._check_rename(item)
            self._wrote(final)
            return

    def _write_general(self, kw: dict[str, Any], tmp: str, final: str, data: bytes) -> None:
        """smbprotocol's [CREATE, WRITE] then [SET_INFO rename, CLOSE] (targets/smbblob.py); a blob larger
        than one write, or than the credits granted, is written by smbclient.open_file (which asks for more)
        and renamed by smbclient.replace."""
        parent = posixpath.dirname(final)
        if parent not in self._dirs and parent.strip("/").count("/") >= 1:
            self._make_dirs(kw, parent)
        for attempt in (1, 2):
            raw = SMBRawIO(self._unc(tmp), mode="w", share_access="", desired_access=_WRITE_ACCESS, **kw)
            conn = raw.fd.connection
            if len(data) > conn.max_write_size or smbblob.available(conn) < smbblob.charge(len(data), False):
                super()._put_renamed(kw, tmp, final, data)
                return
            try:
                try:
                    written = smbblob.write_now(raw, data)
                except SMBOSError as exc:
                    if attempt == 1 and exc.ntstatus in _NO_PATH and raw.closed:
                        self._dirs.discard(parent)
                        self._make_dirs(kw, parent)
                        continue
                    raise
                if written != len(data):
                    raise SMBOSError(NtStatus.STATUS_DISK_FULL, tmp)
                smbblob.rename_now(raw, posixpath.basename(final))
            finally:
                if not raw.closed:
                    with suppress(Exception):  # the caller removes tmp; the original error matters
                        raw.fd.close()
            self._wrote(final)
            return

    def _check_write(self, item: _InFlight) -> None:
        """Take the write compound's replies; keeps the file's handle in `item` for its rename. Raises
        SMBOSError for the file's failure (a missing directory: STATUS_OBJECT_PATH_NOT_FOUND), TargetError
        when a file has the directory's name, and a short write as a full disk. A handle the write opened is
        closed on any failure."""
        timeout = self._kw["connection_timeout"]
        answers = [item.wire.wait(reply, timeout) for reply in item.replies]  # every one, failed or not
        parent = posixpath.dirname(item.final)
        folder_status = 0
        if item.folder:
            (folder_status, folder_body), answers = answers[0], answers[2:]
        (opened_status, opened_body), (write_status, write_body) = answers
        opened = smbfast.created(opened_status, opened_body)
        try:
            if item.folder and folder_status in smbblob.NOT_A_DIRECTORY:
                raise self._in_the_way(parent)
            if item.folder and folder_status == 0:
                self._note_dir(parent, smbfast.created(folder_status, folder_body).created)
            if opened_status != 0 or write_status != 0:
                raise SMBOSError(opened_status or write_status, self._unc(item.tmp))
            if smbfast.written(write_status, write_body) != len(item.data or b""):
                raise SMBOSError(NtStatus.STATUS_DISK_FULL, self._unc(item.tmp))
        except BaseException:
            if opened.file_id:
                with suppress(Exception):
                    item.wire.wait(item.wire.send([smbfast.close(opened.file_id)])[0], timeout)
            raise
        item.file_id = opened.file_id

    def _send_rename(self, item: _InFlight) -> None:
        item.data = None
        item.renaming = True
        rename = smbfast.rename(item.file_id, self._relative(item.final))
        item.replies = item.wire.send([rename, smbfast.close(item.file_id)])

    def _check_rename(self, item: _InFlight) -> None:
        """The rename's and the close's replies (unrelated requests: the handle is closed either way)."""
        timeout = self._kw["connection_timeout"]
        answers = [item.wire.wait(reply, timeout) for reply in item.replies]
        failed = next((status for status, _ in answers if status != 0), None)
        if failed is not None:
            raise SMBOSError(failed, self._unc(item.final))

    def _wrote(self, final: str) -> None:
        if self._fresh and self._in_fresh_dir(final):
            self._fresh_written.add(final)

    # -- chunk writes in flight (inside grouped())
    def _pipelined(self, final: str) -> bool:
        return bool(self._grouping) and any(final.startswith(under) for under in self._grouped_under)

    def _await_credits(self, conn: Any, need: int) -> None:
        """Until `conn` has `need` credits, or none of our writes on it is still unanswered (the caller then
        takes the general path, which asks for credits itself)."""
        while smbblob.available(conn) < need and _healthy(conn):
            with self._lock:
                waiting = next((i for i in (*self._writing, *self._renaming)
                                if i.wire.connection is conn and not i.replies[-1].answered()), None)
            if waiting is None or not waiting.replies[-1].response_event.wait(self._kw["connection_timeout"]):
                return

    def _advance(self, depth: int) -> None:
        """Finish the oldest chunk writes in flight while more than `depth` writes (or renames) are unchecked:
        check a write's reply and send its rename; check a rename's reply. Whichever writer is over the limit
        does it, so nobody waits for a round trip that has not long been answered. A failure is kept for
        the end of the block (and stops the next chunk write at once)."""
        while True:
            with self._lock:
                if len(self._writing) > depth:
                    item = self._writing.popleft()
                elif len(self._renaming) > depth:
                    item = self._renaming.popleft()
                else:
                    return
            try:
                self._finish(item)
            except BaseException as exc:  # noqa: BLE001 - kept and raised at the end of the block
                self._abandon(item, exc)

    def _finish(self, item: _InFlight) -> None:
        if item.renaming:
            self._check_rename(item)
            self._wrote(item.final)
            return
        parent = posixpath.dirname(item.final)
        try:
            self._check_write(item)
        except SMBOSError as exc:
            if exc.ntstatus not in _NO_PATH:
                raise
            self._dirs.discard(parent)  # the directory is gone: make it, and write this blob again now
            self._make_dirs(item.kw, parent)
            assert item.data is not None
            self._write_blob(item.kw, item.tmp, item.final, item.data, pipelined=False)
            return
        self._send_rename(item)
        with self._lock:
            self._renaming.append(item)

    def _abandon(self, item: _InFlight, exc: BaseException) -> None:
        """A chunk write failed after its writer went on (its handle is closed by then): remove its
        temporary file, keep the error."""
        with suppress(Exception):
            self._remove(item.kw, item.tmp)
        inside = item.final[len(self.root):].lstrip("/")
        error = exc if isinstance(exc, TargetError) else self._translate(exc, "writing", inside) or exc
        with self._lock:
            if self._failure is None:
                self._failure = error

    def _rename(self, kw: dict[str, Any], src: str, dst: str) -> None:
        smbclient.replace(self._unc(src), self._unc(dst), **kw)

    def _remove(self, kw: dict[str, Any], full_path: str) -> None:
        try:
            smbclient.remove(self._unc(full_path), **kw)
        except SMBOSError as exc:
            if exc.errno == 2:
                raise FileNotFoundError(2, "No such file", full_path) from None
            raise

    def _makedirs(self, full_path: str) -> None:
        """One [CREATE dir (open if it exists), CLOSE] compound per level, from the leaf up only as far as the
        server says a parent is missing. The share itself ("/share") cannot be created."""
        if full_path in self._dirs or full_path.strip("/").count("/") < 1:
            return
        with self._session() as kw:
            self._make_dirs(kw, full_path)

    def _make_dirs(self, kw: dict[str, Any], full_path: str) -> None:
        """_makedirs on the connection the caller holds."""
        missing = [full_path] if full_path.strip("/").count("/") >= 1 else []
        while missing:
            path = missing[-1]
            try:
                created = self._mkdir(kw, path)
            except SMBOSError as exc:
                parent = posixpath.dirname(path)
                creatable = parent.strip("/").count("/") >= 1 and parent not in missing
                if exc.ntstatus in _NO_PATH and creatable:
                    missing.append(parent)
                    continue
                raise
            self._note_dir(path, created)
            missing.pop()

    def _mkdir(self, kw: dict[str, Any], full_path: str) -> bool:
        """Open or create one directory; True if this call created it."""
        raw = SMBRawIO(self._unc(full_path), mode="a", **kw)  # for its tree and Open; never opened itself
        compound = SMBFileTransaction(raw)
        compound += smbblob.dir_create(raw.fd)
        compound += raw.fd.close(send=False)
        try:
            compound.commit()
        except SMBOSError as exc:
            if exc.ntstatus in smbblob.NOT_A_DIRECTORY:
                raise self._in_the_way(full_path) from None
            raise
        return raw.fd.create_action == CreateAction.FILE_CREATED

    def _in_the_way(self, full_path: str) -> TargetError:
        inside = full_path[len(self.root):].lstrip("/") if full_path.startswith(self.root) else full_path
        return TargetError(
            f"target '{self.name}': {self.display(inside)} is a file where hotvm needs a directory",
            "move that file out of the way (hotvm keeps its repository in directories there)",
        )

    def listdir(self, path: str) -> list[str]:
        with self._errors("listing", path), self._session() as kw:
            try:
                return sorted(smbclient.listdir(self._unc(self.full(path)), **kw))
            except SMBOSError as exc:
                if exc.errno == 2:
                    return []
                raise

    def delete_tree(self, path: str) -> None:
        full = self.full(path)
        with self._errors("deleting", path), self._session() as kw:
            inside = lambda d: d == full or d.startswith(full.rstrip("/") + "/")  # noqa: E731
            self._dirs = {d for d in self._dirs if not inside(d)}
            self._fresh = {d for d in self._fresh if not inside(d)}
            self._fresh_written = {p for p in self._fresh_written if not inside(p)}
            try:
                smbclient.shutil.rmtree(self._unc(full), **kw)
            except SMBOSError as exc:
                if exc.errno != 2:
                    raise

    def free_bytes(self) -> int | None:
        share = "/" + self.root.strip("/").split("/")[0]
        try:
            with self._errors("checking free space on", ""), self._session() as kw:
                return smbclient.stat_volume(self._unc(share), **kw).caller_available_size
        except TargetError:
            return None

    def close(self) -> None:
        self._pool.close()


def open_smb(config: TargetConfig) -> SMBTarget:
    parts = urlsplit(config.url)
    path = unquote(parts.path).rstrip("/")
    if not parts.hostname or path.count("/") < 1 or path == "/":
        raise ConfigError(f"target '{config.name}': smb URL needs a host and a share: {parts.geturl()}",
                          "write it as smb://user@host[:port]/share/path")
    user = unquote(parts.username) if parts.username else None
    if user and ";" in user:  # smb://DOMAIN;user@host (the usual SMB URL form) -> DOMAIN\user
        domain, _, name = user.partition(";")
        user = f"{domain}\\{name}"
    cred = credentials.password(config)
    target = SMBTarget(config, parts.hostname, parts.port or 445, user, cred, path)
    target.connect()
    return target

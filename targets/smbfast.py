"""The few SMB2 requests of a chunk write, packed with struct and their replies taken without smbprotocol's
Structure classes (targets/smb.py uses this on sessions smbwire.usable() covers: signed or not, unencrypted,
no DFS):

    write:   [CREATE dir (open or create), CLOSE]  [CREATE tmp, WRITE data]   (the first chain if asked)
    rename:  [SET_INFO rename over the final name] [CLOSE]

smbprotocol builds each request and each reply header as a Structure of Field objects: about 0.1 ms to build
and pack a request header, 0.25 ms to unpack a reply header and pack it again to check its signature, 0.15 ms
for a CREATE request. A chunk's two compounds carry six to eight of them, each way: 2-3 ms of Python per
4 MiB chunk, the largest part of hotvm's client CPU on an SMB export after hashing. Here a request is one
struct.pack and the data is signed in place and sent with sendmsg (smbwire); the reply is parsed with
struct.unpack_from by the connection's receive thread itself, before smbprotocol sees it.

What stays smbprotocol's: negotiate, session setup, tree connect, the message ids and credit window (taken
and returned under its sequence_lock, as Connection._send and its receive loop do), the outstanding-request
table (every request here is registered in it, so a dropped connection wakes its waiter, and a reply that
arrives in a message with replies of other requests is handled by smbprotocol's loop as usual), and every
other request. Replies are signature-checked here with the session's key on the bytes as received; a reply
that should be signed and is not is refused when it says success (an unsigned error can only fail the write).
"""

from __future__ import annotations

import hmac
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from smbprotocol.exceptions import SMBConnectionClosed, SMBException

from targets import smbwire

_HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")
"""SMB2 sync header ([MS-SMB2] 2.2.1.2): protocol id, size 64, credit charge, status (channel sequence in a
request), command, credits asked/granted, flags, next command, message id, reserved/process id, tree id,
session id, signature."""
_CREATE = struct.Struct("<HBBIQQIIIIIHHII")  # 2.2.13, 56 bytes before the name
_WRITE = struct.Struct("<HHIQ16sIIHHI")  # 2.2.21, 48 bytes before the data
_SET_INFO = struct.Struct("<HBBIHHI16s")  # 2.2.39, 32 bytes before the buffer
_RENAME = struct.Struct("<B7xQI")  # FILE_RENAME_INFORMATION_TYPE_2 ([MS-FSCC] 2.4.37.2), 20 bytes
_CLOSE = struct.Struct("<HHI16s")  # 2.2.15
_PROTOCOL = b"\xfeSMB"
_CREATE_CMD, _CLOSE_CMD, _WRITE_CMD, _SET_INFO_CMD = 0x05, 0x06, 0x09, 0x11
_SERVER_TO_REDIR, _ASYNC, _RELATED, _SIGNED = 0x1, 0x2, 0x4, 0x8
_PENDING = 0x00000103
_RELATED_FILE = b"\xff" * 16
"""The file id a related request uses for the handle its chain opened."""
_IMPERSONATION = 2
_READ_ATTRIBUTES, _WRITE_DATA, _WRITE_ATTRIBUTES, _DELETE = 0x80, 0x2, 0x100, 0x10000
_DIRECTORY_ATTRIBUTE, _NORMAL_ATTRIBUTE = 0x10, 0x80
_SHARE_ALL = 0x7
_OPEN, _OPEN_IF, _OVERWRITE_IF = 1, 3, 5
_DIRECTORY_FILE, _NON_DIRECTORY_FILE = 0x1, 0x40
_FILE_CREATED = 2
_FILE_INFO, _RENAME_CLASS = 1, 10


class UnsignedReply(SMBException):
    """A success reply without the signature the session requires."""


@dataclass
class Message:
    """One request of a compound: its command, its body (without data) and, for a WRITE, the data."""

    command: int
    body: bytes
    related: bool = False
    payload: memoryview | None = None


def _create(name: str, access: int, attributes: int, share: int, disposition: int, options: int) -> Message:
    path = name.encode("utf-16-le")
    body = _CREATE.pack(57, 0, 0, _IMPERSONATION, 0, 0, access, attributes, share, disposition, options,
                        64 + _CREATE.size, len(path), 0, 0) + path
    return Message(_CREATE_CMD, body)


def create(name: str, directory: bool = False) -> Message:
    """CREATE of `name` (share-relative, backslashes): a file for writing, replaced if it exists, or a
    directory opened if it exists and created if not. No create contexts: nothing for the server to grant."""
    if directory:
        return _create(name, _READ_ATTRIBUTES, _DIRECTORY_ATTRIBUTE, _SHARE_ALL, _OPEN_IF, _DIRECTORY_FILE)
    return _create(name, _WRITE_DATA | _WRITE_ATTRIBUTES | _DELETE, _NORMAL_ATTRIBUTE, 0, _OVERWRITE_IF,
                   _NON_DIRECTORY_FILE)


def lookup(name: str) -> Message:
    """CREATE that opens `name` (file or directory) only to read its attributes: does it exist?"""
    return _create(name, _READ_ATTRIBUTES, _NORMAL_ATTRIBUTE, _SHARE_ALL, _OPEN, 0)


def write(data: bytes | bytearray | memoryview, offset: int = 0) -> Message:
    """WRITE of `data` on the handle its chain opened (the request right before it)."""
    view = memoryview(data).cast("B")
    body = _WRITE.pack(49, 64 + _WRITE.size, len(view), offset, _RELATED_FILE, 0, 0, 0, 0, 0)
    return Message(_WRITE_CMD, body, related=True, payload=view)


def rename(file_id: bytes, name: str) -> Message:
    """SET_INFO FileRenameInformation: the open file becomes `name` (share-relative), replacing it."""
    path = name.encode("utf-16-le")
    info = _RENAME.pack(1, 0, len(path)) + path
    head = _SET_INFO.pack(33, _FILE_INFO, _RENAME_CLASS, len(info), 64 + _SET_INFO.size, 0, 0, file_id)
    return Message(_SET_INFO_CMD, head + info)


def close(file_id: bytes = _RELATED_FILE) -> Message:
    """CLOSE of `file_id`; by default of the handle its chain opened."""
    return Message(_CLOSE_CMD, _CLOSE.pack(24, 0, 0, file_id), related=file_id == _RELATED_FILE)


class _Field:
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def get_value(self) -> int:
        return self.value


class Reply:
    """A request on the wire. It stands in smbprotocol's outstanding-request table for its Request (the
    attributes its receive loop and disconnect use), and takes the reply's status and body."""

    __slots__ = ("session_id", "message", "response", "response_event", "response_event_lock", "async_id",
                 "related_ids", "cancelled", "command", "message_id", "status", "body")

    def __init__(self, session_id: int, message_id: int, command: int) -> None:
        self.session_id, self.message_id, self.command = session_id, message_id, command
        self.message = {"reserved": _Field(0), "command": _Field(command), "message_id": _Field(message_id)}
        self.response: Any = None
        self.response_event = threading.Event()
        self.response_event_lock = threading.Lock()
        self.async_id: bytes | None = None
        self.related_ids: list[int] = []
        self.cancelled = False
        self.status: int | None = None
        self.body = b""

    def answered(self) -> bool:
        """Answered, or woken by the connection's end (an interim answer counts where smbprotocol's loop took
        it)."""
        return self.response_event.is_set()


class Wire:
    """One connection's session and tree, as this module writes to them, and its replies in flight."""

    def __init__(self, connection: Any, session: Any, tree: Any) -> None:
        self.connection, self.session, self.tree = connection, session, tree
        self.session_id, self.tree_id = session.session_id, tree.tree_connect_id
        self.pending: dict[int, Reply] = {}
        self.sign = bool(session.signing_required and session.signing_key)

    # -- sending
    def send(self, messages: Sequence[Message]) -> list[Reply]:
        """Send `messages` as one compound; their Replies, in order."""
        connection = self.connection
        multi = connection.supports_multi_credit
        wire: list[bytes | memoryview] = []
        replies: list[Reply] = []
        last = len(messages) - 1
        charges = [(1 + (max(len(m.payload), 1) - 1) // smbwire.MAX_PAYLOAD if m.payload is not None else 1)
                   if multi else 0 for m in messages]
        # Ids and credits under smbprotocol's lock, as Connection._send, for the whole compound or none of it:
        # an id taken and never sent would stall the server's window.
        with connection.sequence_lock:
            window = connection.sequence_window
            if sum(charges) > window["high"] - window["low"]:
                raise smbwire._no_credits(sum(charges), window["high"] - window["low"])  # noqa: SLF001
            first = window["low"]
            window["low"] += sum(max(c, 1) for c in charges)
        message_id = first
        for i, (message, charge) in enumerate(zip(messages, charges, strict=True)):
            if i:
                message_id += max(charges[i - 1], 1)
            padding = b"" if i == last else b"\x00" * (-len(message.body) % 8)
            flags = (_RELATED if i and message.related else 0) | (_SIGNED if self.sign else 0)
            size = 0 if i == last else 64 + len(message.body) + len(padding)
            head = _HEADER.pack(_PROTOCOL, 64, charge, 0, message.command, max(charge, 1), flags, size,
                                message_id, 0, self.tree_id, self.session_id, bytes(16))
            packed = head + message.body + padding
            if self.sign:
                signer = smbwire._Signer(connection, self.session.signing_key, message_id,  # noqa: SLF001
                                         message.command)
                signer.update(packed)
                if message.payload is not None:
                    signer.update(message.payload)
                packed = packed[:48] + signer.signature() + packed[64:]
            wire.append(packed)
            if message.payload is not None:
                wire.append(message.payload)
            reply = Reply(self.session_id, message_id, message.command)
            self.pending[message_id] = reply
            connection.outstanding_requests[message_id] = reply
            replies.append(reply)
        total = sum(len(part) for part in wire)
        if total > smbwire.MAX_NBSS:
            raise ValueError(f"an SMB message of {total} bytes exceeds the transport's {smbwire.MAX_NBSS}")
        connection._check_worker_running()  # noqa: SLF001 - as Connection._send does before sending
        transport = connection.transport
        with transport._sock_lock:  # noqa: SLF001 - one message at a time on the socket, as Tcp.send
            smbwire._send_all(transport._sock, [struct.pack(">I", total), *wire])  # noqa: SLF001
        return replies

    # -- waiting
    def wait(self, reply: Reply, timeout: float) -> tuple[int, bytes]:
        """The reply's status and body once its final answer came (an interim STATUS_PENDING is none)."""
        connection = self.connection
        while True:
            if not reply.response_event.wait(timeout):
                raise SMBException(f"no reply to SMB message {reply.message_id} within {timeout} s")
            with reply.response_event_lock:
                if reply.status is not None:
                    return reply.status, reply.body
                header = reply.response
                if header is None:  # woken by the connection's end
                    connection._check_worker_running()  # noqa: SLF001 - raises the receive thread's error
                    raise SMBConnectionClosed("SMB connection closed while a chunk write was in flight")
                status = header["status"].get_value()
                if status == _PENDING:  # smbprotocol's loop took it (a mixed message): wait on, as receive()
                    reply.response = None
                    reply.response_event.clear()
                    continue
                self._forget(reply)
                return status, header["data"].get_value()

    def _forget(self, reply: Reply) -> None:
        self.pending.pop(reply.message_id, None)
        self.connection.outstanding_requests.pop(reply.message_id, None)

    # -- receiving (on the connection's receive thread)
    def take(self, msg: bytes | memoryview) -> bool:
        """Handle a received message if every reply in it answers a request of ours; False (nothing done)
        otherwise: smbprotocol's loop handles it, ours included (see wait())."""
        parts = []
        offset, size = 0, len(msg)
        while True:
            if size - offset < 64:
                return False
            fields = _HEADER.unpack_from(msg, offset)
            reply = self.pending.get(fields[8])
            if fields[0] != _PROTOCOL or reply is None or fields[4] != reply.command:
                return False
            end = offset + fields[7] if fields[7] else size
            if end > size or end - offset < 64:
                return False
            parts.append((reply, offset, end, fields))
            if not fields[7]:
                break
            offset = end
        connection = self.connection
        for reply, start, end, fields in parts:
            status, credits, flags = fields[3], fields[5], fields[6]
            interim = status == _PENDING and bool(flags & _ASYNC)
            if not interim:
                self._verify(msg, start, end, fields)
            if credits == 0 and not connection.supports_multi_credit:
                credits = 1  # as smbprotocol: a dialect without credits still moves the window
            with connection.sequence_lock:
                connection.sequence_window["high"] += credits
            if interim:
                reply.async_id = bytes(msg[start + 32:start + 40])
                continue
            with reply.response_event_lock:
                reply.status, reply.body = status, bytes(msg[start + 64:end])
                self._forget(reply)
                reply.response_event.set()
        return True

    def _verify(self, msg: bytes | memoryview, start: int, end: int, fields: tuple[Any, ...]) -> None:
        flags, status = fields[6], fields[3]
        if not flags & _SIGNED:
            if self.sign and status == 0:
                raise UnsignedReply(f"unsigned reply to SMB message {fields[8]} on a signed session")
            return
        signer = smbwire._Signer(self.connection, self.session.signing_key, fields[8], fields[4],  # noqa: SLF001
                                 response=bool(flags & _SERVER_TO_REDIR))
        signer.update(bytes(msg[start:start + 48]) + bytes(16) + bytes(msg[start + 64:end]))
        if not hmac.compare_digest(signer.signature(), fields[12]):
            raise SMBException("Server message signature could not be verified")


def install(connection: Any) -> None:
    """Let the connection's receive thread hand our replies to their Wire before smbprotocol parses them
    (called once per connection, after smbwire.receive_large_replies_in_place)."""
    transport = connection.transport
    inner = transport.recv
    connection.hotvm_wires = wires = []

    def recv(timeout: float) -> Any:
        while True:
            msg = inner(timeout)
            if not msg or not any(w.pending for w in wires) or msg[:4] != _PROTOCOL:
                return msg
            if not any(w.take(msg) for w in wires):
                return msg

    transport.recv = recv


def wire_for(connection: Any, session: Any, tree: Any) -> Wire:
    """The connection's Wire for `tree` (one per tree: a target writes to one share)."""
    wires = connection.hotvm_wires
    for w in wires:
        if w.tree is tree:
            return w
    made = Wire(connection, session, tree)
    wires.append(made)
    return made


@dataclass
class Created:
    """What a CREATE's reply says: its status, the file id, and whether it created the file."""

    status: int
    file_id: bytes
    created: bool


def created(status: int, body: bytes) -> Created:
    """Parse a CREATE reply body (2.2.14: create action at 4, file id at 64)."""
    if status != 0 or len(body) < 80:
        return Created(status, b"", False)
    return Created(status, bytes(body[64:80]), struct.unpack_from("<I", body, 4)[0] == _FILE_CREATED)


def written(status: int, body: bytes) -> int:
    """The byte count of a successful WRITE reply (2.2.22: count at 4)."""
    if status != 0 or len(body) < 8:
        return 0
    return int(struct.unpack_from("<I", body, 4)[0])

"""One blob written to an SMB share as two compound requests, each split into send and await, so that several
blobs can be in flight on one connection (targets/smb.py decides when to wait for what):

    write:   [CREATE dir (open or create), CLOSE]  [CREATE tmp, WRITE data]   (the first chain if asked)
    rename:  [SET_INFO rename over the final name, CLOSE]

The rename is its own compound, sent only once the write's reply says every byte was written: a short write
is no error, and a server need not fail the related requests after a failed WRITE, so a cut blob could be
renamed into place. The data is sent by targets/smbwire.py (no copies), the replies are smbprotocol's.
"""

from __future__ import annotations

import ntpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smbclient._io import SMBFileTransaction, SMBRawIO, set_info
from smbprotocol import MAX_PAYLOAD_SIZE
from smbprotocol.connection import Request
from smbprotocol.exceptions import SMBOSError, SMBResponseException
from smbprotocol.file_info import FileAttributes, FileRenameInformation
from smbprotocol.header import NtStatus
from smbprotocol.open import (
    CreateAction,
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)

from targets import smbwire

_SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE
NOT_A_DIRECTORY = {NtStatus.STATUS_NOT_A_DIRECTORY, NtStatus.STATUS_OBJECT_NAME_COLLISION}
"""What opening a directory answers when a file has its name."""


class NotADirectory(Exception):
    """A file is where the blob's directory should be."""


def dir_create(folder: Open) -> tuple[Any, Any]:
    """CREATE of a directory, opened if it exists, created if not (the reply's create_action says which)."""
    return folder.create(ImpersonationLevel.Impersonation, FilePipePrinterAccessMask.FILE_READ_ATTRIBUTES,
                         FileAttributes.FILE_ATTRIBUTE_DIRECTORY, _SHARE_ALL, CreateDisposition.FILE_OPEN_IF,
                         CreateOptions.FILE_DIRECTORY_FILE, send=False)


def available(connection: Any) -> int:
    """Credits the server has granted and no request holds."""
    return connection.sequence_window["high"] - connection.sequence_window["low"]


def charge(size: int, folder: bool) -> int:
    """Credits a blob's two compounds take (CREATE dir, CLOSE; CREATE, WRITE; SET_INFO, CLOSE)."""
    return (2 if folder else 0) + 1 + max(1, -(-size // MAX_PAYLOAD_SIZE)) + 2


@dataclass
class Sent:
    """A compound on the wire: its requests and, for each, smbprotocol's function that takes its reply."""

    requests: list[Request]
    unpack: list[Callable[[Request], Any]]
    folder: Open | None = None

    def answered(self) -> bool:
        return all(r.response_event.is_set() for r in self.requests)

    def wait(self, timeout: float | None) -> bool:
        """Until the server answered the last request (an interim answer counts); False on timeout."""
        return not self.requests or bool(self.requests[-1].response_event.wait(timeout))

    def replies(self) -> list[Any]:
        """Each request's unpacked reply, or its SMBResponseException: every reply is taken, even after a
        failure (smbprotocol would otherwise keep waiting for them, as SMBFileTransaction.commit knows)."""
        out: list[Any] = []
        for request, unpack in zip(self.requests, self.unpack, strict=True):
            try:
                out.append(unpack(request))
            except SMBResponseException as exc:
                out.append(exc)
        return out


def _ids(raw: SMBRawIO) -> tuple[int, int]:
    tree = raw.fd.tree_connect
    return tree.session.session_id, tree.tree_connect_id


def usable(raw: SMBRawIO) -> bool:
    """Whether smbwire covers this session (signed or not, unencrypted, no DFS)."""
    return smbwire.usable(raw.fd.connection, *_ids(raw))


def send_write(raw: SMBRawIO, data: bytes | bytearray | memoryview, folder: bool) -> Sent:
    """Send [CREATE raw's file, WRITE data] on the unopened `raw` (only where usable()), after [CREATE its
    directory, CLOSE] when `folder`."""
    fd = raw.fd
    actions: list[tuple[Any, Any]] = []
    related: list[bool] = []
    parent = None
    if folder:
        parent = Open(fd.tree_connect, ntpath.dirname(fd.file_name))
        actions += [dir_create(parent), parent.close(send=False)]
        related += [False, True]
    create = SMBFileTransaction(raw)
    raw.open(transaction=create)  # queues smbprotocol's CREATE request and its reply handler
    actions += [*create._actions, (smbwire.write_request(fd, len(data)), fd._write_response)]  # noqa: SLF001
    related += [False, True]
    requests = smbwire.send_compound(fd.connection, [m for m, _ in actions], *_ids(raw), data, related)
    return Sent(requests, [u for _, u in actions], parent)


def await_write(raw: SMBRawIO, sent: Sent) -> tuple[int, bool | None]:
    """The bytes the server wrote, and whether the directory CREATE made the directory (None: it was not in
    the compound). SMBOSError for the file's failure; NotADirectory when a file has the directory's name."""
    replies = sent.replies()
    made = None
    if sent.folder is not None:
        opened, replies = replies[0], replies[2:]
        if isinstance(opened, SMBResponseException):
            if opened.status in NOT_A_DIRECTORY:
                raise NotADirectory(ntpath.dirname(raw.name))
        else:
            made = sent.folder.create_action == CreateAction.FILE_CREATED
    failures = [r for r in replies if isinstance(r, SMBResponseException)]
    if failures:
        raise SMBOSError(failures[0].status, raw.name)
    return replies[1], made


def write_now(raw: SMBRawIO, data: bytes | bytearray | memoryview) -> int:
    """[CREATE, WRITE] by smbprotocol itself (encrypted sessions, DFS); the bytes written."""
    opened = SMBFileTransaction(raw)
    raw.open(transaction=opened)
    opened += raw.fd.write(data, send=False)
    opened.commit()
    return opened.results[1]


def send_rename(raw: SMBRawIO, final_name: str) -> Sent:
    """Send [SET_INFO rename to `final_name` (a name in the same directory) replacing it, CLOSE]."""
    fd = raw.fd
    renamed = SMBFileTransaction(raw)
    rename = FileRenameInformation()
    rename["replace_if_exists"] = True
    rename["file_name"] = ntpath.join(ntpath.dirname(fd.file_name), final_name)
    set_info(renamed, rename)
    raw.close(transaction=renamed)
    actions = renamed._actions  # noqa: SLF001
    if not usable(raw):
        renamed.commit()
        return Sent([], [])
    requests = smbwire.send_compound(fd.connection, [m for m, _ in actions], *_ids(raw))
    return Sent(requests, [u for _, u in actions])


def await_rename(raw: SMBRawIO, sent: Sent) -> None:
    failures = [r for r in sent.replies() if isinstance(r, SMBResponseException)]
    if failures:
        raise SMBOSError(failures[0].status, raw.name)

"""One blob written to an SMB share by smbprotocol itself, where targets/smbfast.py does not cover the
session (encrypted, DFS) or the blob (larger than one write): [CREATE, WRITE], then, once the reply says every
byte was written, [SET_INFO rename over the final name, CLOSE] on the same handle.

The rename is its own compound: a short write is no error, and a server need not fail the related requests
after a failed WRITE, so a cut blob could be renamed into place.
"""

from __future__ import annotations

import ntpath
from typing import Any

from smbclient._io import SMBFileTransaction, SMBRawIO, set_info
from smbprotocol import MAX_PAYLOAD_SIZE
from smbprotocol.file_info import FileAttributes, FileRenameInformation
from smbprotocol.header import NtStatus
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)

_SHARE_ALL = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE
NOT_A_DIRECTORY = {NtStatus.STATUS_NOT_A_DIRECTORY, NtStatus.STATUS_OBJECT_NAME_COLLISION}
"""What opening a directory answers when a file has its name."""


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


def write_now(raw: SMBRawIO, data: bytes | bytearray | memoryview) -> int:
    """[CREATE, WRITE] on the unopened `raw`; the bytes written."""
    opened = SMBFileTransaction(raw)
    raw.open(transaction=opened)
    opened += raw.fd.write(data, send=False)
    opened.commit()
    return opened.results[1]


def rename_now(raw: SMBRawIO, final_name: str) -> None:
    """[SET_INFO rename to `final_name` (a name in the same directory) replacing it, CLOSE] on the open
    `raw`."""
    renamed = SMBFileTransaction(raw)
    rename = FileRenameInformation()
    rename["replace_if_exists"] = True
    rename["file_name"] = ntpath.join(ntpath.dirname(raw.fd.file_name), final_name)
    set_info(renamed, rename)
    raw.close(transaction=renamed)
    renamed.commit()

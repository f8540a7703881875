"""What targets/smbfast.py and smb.py need below smbprotocol to move 4 MiB messages without its copies.

smbprotocol packs every request into bytes and builds the wire message by concatenation: a 4 MiB WRITE was
copied about eight times on its way out (Structure.pack of the request and of its header, the signature
splice, the signature's own zeroed copy, the compound concatenation, the NetBIOS framing), which py-spy showed
as 60 % of an SMB backup's Python time. So a message's data is signed where it lies (_Signer: AES-GMAC,
AES-CMAC or HMAC-SHA256 take it in pieces) and handed to the kernel with sendmsg next to its small parts
(_send_all); smbfast.py packs those parts. A large reply (a READ's data) is received into one buffer and its
signature checked in place (receive_large_replies_in_place, verify_large_replies_in_place). Only where this
covers the session: signed or unsigned, not encrypted, and a share without DFS; `usable()` says so, and
callers take smbprotocol's path otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import select
import socket
import struct
import time
from typing import Any

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from smbprotocol import Dialects
from smbprotocol.connection import SigningAlgorithms
from smbprotocol.exceptions import SMBException
from smbprotocol.header import Commands, NtStatus, Smb2Flags

MAX_PAYLOAD = 65536
LARGE_REPLY = 65536
"""Replies at least this large are verified in place (smaller ones: smbprotocol's copies cost nothing)."""
MAX_NBSS = 0xFFFFFF
"""Direct TCP transport: one message of at most 2^24 - 1 bytes."""


def usable(connection: Any, session_id: int, tree_id: int) -> bool:
    session = connection.session_table.get(session_id)
    tree = session.tree_connect_table.get(tree_id) if session else None
    return bool(session and tree and not session.encrypt_data and not tree.encrypt_data
                and not tree.is_dfs_share)


class _Signer:
    """The SMB2 signature of one message given in pieces, as smbprotocol's _generate_signature computes it
    for the whole message."""

    def __init__(self, connection: Any, key: bytes, message_id: int, command: int,
                 response: bool = False) -> None:
        if connection.dialect >= Dialects.SMB_3_1_1 and connection.signing_algorithm_id is not None:
            algorithm = connection.signing_algorithm_id
        elif connection.dialect >= Dialects.SMB_3_0_0:
            algorithm = SigningAlgorithms.AES_CMAC
        else:
            algorithm = SigningAlgorithms.HMAC_SHA256
        if algorithm == SigningAlgorithms.AES_GMAC:
            info = (1 if response else 0) | (2 if command == Commands.SMB2_CANCEL else 0)
            nonce = message_id.to_bytes(8, "little") + info.to_bytes(4, "little")
            gcm = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
            self._update, self._final = gcm.authenticate_additional_data, lambda: (gcm.finalize(), gcm.tag)[1]
        elif algorithm == SigningAlgorithms.AES_CMAC:
            mac = cmac.CMAC(algorithms.AES(key))
            self._update, self._final = mac.update, mac.finalize
        else:
            digest = hmac.new(key, digestmod=hashlib.sha256)
            self._update, self._final = digest.update, lambda: digest.digest()[:16]

    def update(self, data: bytes | memoryview) -> None:
        self._update(data)

    def signature(self) -> bytes:
        return self._final()


def verify_large_replies_in_place(connection: Any) -> None:
    """Check the signature of this connection's large replies (a READ's data) without smbprotocol's three
    copies of them (Connection.verify_signature re-packs the whole header and splices a zeroed copy): the
    64-byte header is packed alone and the data signed where it lies. Smaller replies, and every decision
    about which replies are signed, stay smbprotocol's."""
    original = connection.verify_signature

    def verify(header: Any, session_id: int, force: bool = False) -> None:
        data = header["data"].get_value()
        session = connection.session_table.get(session_id)
        if len(data) < LARGE_REPLY or session is None or force:
            return original(header, session_id, force)
        message_id = header["message_id"].get_value()
        command = header["command"].get_value()
        if (message_id == 0xFFFFFFFFFFFFFFFF or not header["flags"].has_flag(Smb2Flags.SMB2_FLAGS_SIGNED)
                or header["status"].get_value() == NtStatus.STATUS_PENDING
                or command == Commands.SMB2_SESSION_SETUP):
            return None  # as smbprotocol: such replies carry no signature to check
        fixed = b"".join(field.pack() for name, field in header.fields.items() if name != "data")
        signer = _Signer(connection, session.signing_key, message_id, command, response=True)
        signer.update(fixed[:48] + bytes(16) + fixed[64:])
        signer.update(data)
        if not hmac.compare_digest(signer.signature(), header["signature"].get_value()):
            raise SMBException("Server message signature could not be verified")
        return None

    connection.verify_signature = verify


def receive_large_replies_in_place(connection: Any) -> None:
    """Receive a large message (a READ reply) into one buffer and hand smbprotocol a view of it.

    smbprotocol's Tcp._recv collects a message in recv() pieces, copies each into a bytearray and that into
    bytes; its receive loop then slices a compound reply per response (a copy of each, and of the rest),
    before the reply's data field is copied out once more: six copies of a 4 MiB READ, 19 % of a restore's
    client CPU. With a view, slicing copies nothing and two copies are left (the data field, the READ's
    buffer). Smaller messages (everything but READ replies: directory listings ask for 64 KiB) stay bytes,
    as smbprotocol's parsers of names and security buffers expect."""
    transport = connection.transport
    original = transport.recv

    def recv(timeout: float) -> Any:
        prefix, timeout = transport._recv(4, timeout)  # noqa: SLF001
        if not prefix:
            return b""
        size = struct.unpack(">L", prefix)[0]
        if size < LARGE_REPLY:
            return transport._recv(size, timeout)[0]  # noqa: SLF001
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            started = time.monotonic()
            with transport._close_lock:  # noqa: SLF001 - as Tcp._recv: close() must not race the read
                if not transport.connected:
                    return None
                if not select.select([transport._sock], [], [], max(timeout, 1))[0]:  # noqa: SLF001
                    idle = time.monotonic() - started
                    raise TimeoutError(f"recv idle for {idle:.1f}s ({done}/{size} bytes)")
                try:
                    got = transport._sock.recv_into(view[done:])  # noqa: SLF001
                except OSError as exc:
                    if exc.errno not in (errno.ESHUTDOWN, errno.ECONNRESET, errno.ECONNABORTED):
                        raise
                    got = 0
            timeout -= time.monotonic() - started
            if not got:
                transport.close()
                return None
            done += got
        return view

    transport.recv = recv
    transport.hotvm_original_recv = original


def _no_credits(charge: int, available: int) -> Exception:
    return SMBException(f"Request requires {charge} credits but only {available} credits are available")


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """sendall over several buffers: sendmsg, then whatever the kernel did not take, without joining them."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]

"""Chunk ids: how a repository names its chunks (docs/format.md, "Chunk ids").

A repository records its scheme in its marker (`chunk_hash`) when it is created and keeps it forever:
its chunks are only ever compared with ids computed the same way, so dedup with its older chunks goes on.

    sha256        plain repositories before BLAKE3 (and every marker without `chunk_hash`, unencrypted)
    hmac-sha256   encrypted repositories before BLAKE3 (and every encrypted marker without `chunk_hash`)
    blake3        new plain repositories: ~2.7x sha256 with SHA-NI on this class of CPU, off the GIL
    keyed-blake3  new encrypted repositories: BLAKE3's keyed mode under the repository's own id key
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Literal

import blake3

ChunkHash = Literal["sha256", "hmac-sha256", "blake3", "keyed-blake3"]
Buffer = bytes | bytearray | memoryview
IdFunction = Callable[[Buffer], str]

PLAIN: tuple[str, ...] = ("sha256", "blake3")
KEYED: tuple[str, ...] = ("hmac-sha256", "keyed-blake3")
KNOWN = PLAIN + KEYED
NEW_PLAIN = "blake3"
NEW_KEYED = "keyed-blake3"
LEGACY_PLAIN = "sha256"
LEGACY_KEYED = "hmac-sha256"


def id_key_info(scheme: str) -> bytes:
    """HKDF info of a keyed scheme's id key: each scheme gets its own key (one key, one purpose)."""
    return b"hotvm chunk id key" if scheme == "hmac-sha256" else f"hotvm chunk id key {scheme}".encode()


def id_function(scheme: str, key: bytes | None = None) -> IdFunction:
    """The function that names a chunk's plain content under `scheme` (keyed schemes need their key)."""
    if scheme == "sha256":
        return lambda data: hashlib.sha256(data).hexdigest()
    if scheme == "blake3":
        return lambda data: blake3.blake3(data).hexdigest()
    if key is None or len(key) != 32:
        raise ValueError(f"chunk id scheme {scheme!r} needs a 32-byte key")
    if scheme == "hmac-sha256":
        return lambda data: hmac.new(key, data, hashlib.sha256).hexdigest()
    if scheme == "keyed-blake3":
        return lambda data: blake3.blake3(data, key=key).hexdigest()
    raise ValueError(f"unknown chunk id scheme {scheme!r}")

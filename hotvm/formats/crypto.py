"""Authenticated encryption of a repository's files (docs/format.md, "Encryption").

One secret (a passphrase, or 32 random bytes in base64) from the target's configuration gives a master key
(scrypt over the passphrase, or HKDF over the random key, with the repository's random salt). HKDF splits it
into three independent keys:
  data key   AES-256-GCM for every file: nonce(12) || ciphertext || tag(16), the file's path as AAD
  id key     keyed BLAKE3 (older repositories: HMAC-SHA256) names chunks, so a chunk's name does not reveal
             the hash of its content; each chunk id scheme derives its own id key (hotvm/formats/chunkid.py)
  check key  HMAC of a constant, stored in the marker: a wrong secret is refused before anything is read

The secret and the keys never leave this process: not the target, not a log, not an error message.
`cryptography` is imported only when a repository is encrypted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass

from hotvm.errors import ChecksumMismatch
from hotvm.formats.chunkid import KEYED, NEW_KEYED, id_function, id_key_info

CIPHER = "aes-256-gcm"
CHUNK_ID = NEW_KEYED
"""The chunk id scheme of a new encrypted repository; an existing one keeps what its marker records."""
NONCE = 12
TAG = 16
SCRYPT = {"name": "scrypt", "n": 2**17, "r": 8, "p": 1}
HKDF = {"name": "hkdf-sha256"}
_CHECK_CONSTANT = b"hotvm repository key check v1"


def _raw_key(secret: str) -> bytes | None:
    """The secret as 32 random bytes if it is exactly that in base64 (then no slow KDF is needed)."""
    try:
        raw = base64.b64decode(secret.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _master(secret: str, kdf: dict, salt: bytes) -> bytes:
    if kdf.get("name") == "scrypt":
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(
            secret.encode()
        )
    if kdf.get("name") == "hkdf-sha256":
        raw = _raw_key(secret)
        if raw is None:
            raise ValueError("not a base64 32-byte key")
        return _hkdf(raw, salt, b"hotvm master key")
    raise ValueError(f"unknown kdf {kdf.get('name')!r}")


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF as _HKDF

    return _HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


@dataclass(frozen=True)
class Keys:
    data: bytes
    ids: bytes
    check: bytes

    def __repr__(self) -> str:  # never show key material, not even in a traceback's locals
        return "<Keys (hidden)>"

    def check_value(self) -> str:
        return hmac.new(self.check, _CHECK_CONSTANT, hashlib.sha256).hexdigest()


_cache: dict[str, Keys] = {}
_cache_lock = threading.Lock()


def derive(secret: str, kdf: dict, salt: bytes, chunk_id: str = CHUNK_ID) -> Keys:
    """The three keys for this secret and repository (scrypt runs once per process and repository); the
    id key is the one of the repository's chunk id scheme `chunk_id`."""
    tag = hashlib.sha256(repr((sorted(kdf.items()), salt.hex(), secret, chunk_id)).encode()).hexdigest()
    with _cache_lock:
        if tag in _cache:
            return _cache[tag]
    master = _master(secret, kdf, salt)
    keys = Keys(
        data=_hkdf(master, None, b"hotvm data key"),
        ids=_hkdf(master, None, id_key_info(chunk_id)),
        check=_hkdf(master, None, b"hotvm key check"),
    )
    with _cache_lock:
        _cache[tag] = keys
    return keys


def new_encryption(secret: str) -> tuple[dict, Keys]:
    """The marker's "encryption" entry for a new repository, and its keys."""
    salt = os.urandom(16)
    kdf = dict(HKDF) if _raw_key(secret) is not None else dict(SCRYPT)
    keys = derive(secret, kdf, salt, CHUNK_ID)
    entry = {
        "cipher": CIPHER,
        "chunk_id": CHUNK_ID,
        "kdf": kdf,
        "salt": base64.b64encode(salt).decode(),
        "check": keys.check_value(),
    }
    return entry, keys


def open_encryption(secret: str, entry: dict) -> Keys | None:
    """The keys for an existing repository; None if the secret is not the one it was created with."""
    scheme = entry.get("chunk_id")
    if entry.get("cipher") != CIPHER or scheme not in KEYED:
        raise ValueError(f"unsupported cipher {entry.get('cipher')!r} / chunk id {scheme!r}")
    try:
        keys = derive(secret, dict(entry["kdf"]), base64.b64decode(entry["salt"]), str(scheme))
    except ValueError as exc:
        if "not a base64 32-byte key" in str(exc):
            return None
        raise
    return keys if hmac.compare_digest(keys.check_value(), str(entry.get("check", ""))) else None


class Sealer:
    """Encrypts and authenticates the files of one repository."""

    def __init__(self, keys: Keys, chunk_id: str) -> None:
        """`chunk_id`: the repository's keyed chunk id scheme (its marker's encryption entry says)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if chunk_id not in KEYED:
            raise ValueError(f"{chunk_id!r} is not a keyed chunk id scheme")
        self._aead = AESGCM(keys.data)
        self._chunk_id = id_function(chunk_id, keys.ids)
        self.chunk_hash = chunk_id

    def __repr__(self) -> str:
        return "<Sealer (keys hidden)>"

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return self._chunk_id(data)

    def seal(self, path: str, plain: bytes | bytearray | memoryview) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, bytes(plain), path.encode())

    def open(self, path: str, blob: bytes, what: str) -> bytes:
        """The plain bytes, or ChecksumMismatch: a damaged, truncated, moved or forged file is never
        returned as data."""
        from cryptography.exceptions import InvalidTag

        if len(blob) < NONCE + TAG:
            raise ChecksumMismatch(
                f"{what} is truncated ({len(blob)} bytes)", "the copy on the target is damaged"
            )
        try:
            return self._aead.decrypt(blob[:NONCE], blob[NONCE:], path.encode())
        except InvalidTag:
            raise ChecksumMismatch(
                f"{what} failed authentication (damaged or tampered with)",
                "the copy on the target is damaged; use another backup",
            ) from None

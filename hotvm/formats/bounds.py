"""How large each kind of file on a target may be (docs/security.md, "Tampered, rotted or swapped targets").

Every read from a target names one of these bounds (Target.read_bytes / read_into `limit`), chosen from what
the caller expects, so a tampered target (a chunk made a symlink to /dev/zero, a server streaming without
end) costs at most the bound in memory and fails with one named error (TamperedBlob), never a MemoryError.
The bounds follow from the format's own limits (docs/format.md) and are far above anything hotvm writes.
"""

from __future__ import annotations

from hotvm.formats.manifest import MAX_CHUNK_SIZE

SEAL_OVERHEAD = 12 + 16
"""What sealing adds to a file of an encrypted repository: nonce and tag (formats/crypto.py NONCE + TAG;
not imported from there: crypto loads `cryptography`, which unencrypted runs never need)."""

KiB, MiB = 1 << 10, 1 << 20


def zstd_bound(plain: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest zstd frame (header and checksum included) of `plain` bytes."""
    return plain + (plain >> 8) + (((128 * KiB) - plain) >> 11 if plain < 128 * KiB else 0)


def chunk_max(plain: int) -> int:
    """The largest stored chunk (or patch object) whose plain length is at most `plain` (a disk's
    chunk_size; never beyond MAX_CHUNK_SIZE): its zstd frame, sealed in an encrypted repository."""
    return zstd_bound(min(plain, MAX_CHUNK_SIZE)) + SEAL_OVERHEAD


MARKER_MAX = 1 * MiB
"""hotvm-repository.json: a few hundred bytes of JSON."""
MAX_MANIFEST_BYTES = 1 << 30
"""A manifest larger than this is refused before it is read, decrypted or parsed (parsing costs several
times its size in memory). 1 GiB of JSON lists some 12 million chunks: tens of TiB of non-zero data in one
set (a disk has at most 2^24 chunks)."""
MANIFEST_MAX = MAX_MANIFEST_BYTES + SEAL_OVERHEAD
"""A manifest or a journal (disk record, volume record) as stored."""
CONFIG_ARCHIVE_MAX = zstd_bound(256 * MiB) + SEAL_OVERHEAD
"""config.tar.zst: at most 256 MiB once decompressed (formats/configtar.py MAX_PLAIN_BYTES)."""
ENTRIES_MAX = (2 << 30) + SEAL_OVERHEAD
"""A file set's zstd entry list: at most 16 GiB of JSON once decompressed (files/filesets.py
MAX_ENTRIES_BYTES), which zstd stores in far less than 2 GiB (JSON entry lists compress well over 8:1)."""
DOCUMENT_MAX = 64 * MiB
"""Small JSON documents: started.json, holds, restore-test records, inventory and plan documents, tape
catalogs kept on the target (the largest, a catalog, holds a few hundred bytes per set)."""


def set_file_max(name: str) -> int:
    """The bound of a file in a set directory, by its name (copies and tape copies read every one): JSON
    (manifest, journals, started.json) as a manifest, an entry list as one, anything else (the config
    archive, files of a newer format) as a config archive."""
    if name.endswith(".json"):
        return MANIFEST_MAX
    if name.endswith(".entries.zst"):
        return ENTRIES_MAX
    return CONFIG_ARCHIVE_MAX

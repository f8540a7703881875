"""Layout of a hotvm repository on a target (docs/format.md):

    hotvm-repository.json                 format marker, version and random repository id
    chunks/<h[:2]>/<h>                    zstd-compressed chunk, named by its chunk id (the marker's
                                          chunk_hash: blake3 or, older repositories, sha256; keyed if
                                          encrypted: hotvm/formats/chunkid.py)
    vms/<vm>/<backup_id>/disks/<dev>.json one exported disk (written when its export finished: resume journal)
    vms/<vm>/<backup_id>/config.tar.zst   the VM's config files and description
    vms/<vm>/<backup_id>/manifest.json    written last: a set without it is incomplete and never restored

Chunks are shared by every set in the repository, so a rerun after a failure and next week's backup only
upload what is not there yet.

An encrypted repository (format 2, docs/format.md "Encryption") names chunks by a keyed hash under a key
and stores every file but the marker AES-256-GCM encrypted; this class is the only place that reads or
writes file contents, so the rest of hotvm sees plain bytes either way.

A target is untrusted (docs/security.md): every manifest and disk record carries a checksum and must lie
where it says it belongs, and the repository's identity is remembered per target location
(hotvm/formats/identity.py) and checked on every open and before a set is made visible.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from pydantic import ValidationError

from hotvm.credentials import Credential
from hotvm.errors import BackupSetError, ChecksumMismatch, TargetConfigError, TargetError
from hotvm.formats import chunkid
from hotvm.formats.bounds import CONFIG_ARCHIVE_MAX, DOCUMENT_MAX, MANIFEST_MAX, MARKER_MAX, chunk_max
from hotvm.formats.identity import Identity, IdentityStore, location_of
from hotvm.formats.manifest import CHECKSUMS_SINCE, MANIFEST_FORMAT, DiskRecord, Manifest, new_backup_id
from hotvm.formats.rawframe import BLOCK_MAX, HEAD_MAX, MAX_SCATTER_BLOCKS, RawLayout, raw_layout
from hotvm.formats.setstore import (
    TMP_MARK,
    DamagedManifest,
    SetEntry,
    SetStore,
    checked_backup_id,
    location_problem,
    parse_model,
    safe_name,
    target_name,
    vm_dirs,
)
from targets.base import Target

if TYPE_CHECKING:
    from hotvm.formats.crypto import Sealer

MARKER = "hotvm-repository.json"
ENCRYPTED_FORMAT = 2
"""Repository format of an encrypted repository: a hotvm that predates encryption refuses it (and so never
writes plain chunks into it); an unencrypted repository written before format 3 is format 1. Both are
still read and written (their marker is never rewritten: its digest is their remembered id)."""
REPOSITORY_FORMAT = 4
"""The newest repository format this hotvm reads and writes: 3 = the marker has a random `id`, manifests
and disk records carry checksums, names that need cleaning get a hash suffix (encrypted or not: the
marker's `encryption` entry says); 4 = chunks may be named by BLAKE3 (the marker's `chunk_hash`). Older
hotvm refuses it instead of mistaking new sets for damaged ones (or its chunks for rotten ones)."""

__all__ = [  # the names set stores and older callers import from here
    "DamagedManifest", "ImageSets", "Repository", "SetEntry", "checked_backup_id", "location_problem",
    "new_backup_id", "parse_model", "safe_name", "target_name", "vm_dirs",
]


def manifest_problem(manifest: Manifest, path: str) -> str | None:
    """Why a manifest read from `path` cannot be trusted (checksum, its disks' checksums, location)."""
    problem = manifest.checksum_problem(legacy=manifest.format_version < CHECKSUMS_SINCE)
    if problem:
        return problem
    for disk in manifest.disks:
        if disk.checksum is not None and disk.checksum_problem(legacy=True):
            return f"disk '{disk.device}': {disk.checksum_problem(legacy=True)}"
    return location_problem(path, manifest.vm, manifest.backup_id)


def read_marker(target: Target, hint: str = "upgrade hotvm") -> dict | None:
    """The repository marker, None if the target holds no repository; refuses a newer format."""
    try:
        meta = json.loads(target.read_bytes(MARKER, MARKER_MAX))
    except FileNotFoundError:
        return None
    except ValueError:
        raise BackupSetError(
            f"{MARKER} on target '{target.name}' is unreadable", "run 'hotvm check'; fix or restore it"
        ) from None
    if not isinstance(meta, dict):
        raise BackupSetError(f"{MARKER} on target '{target.name}' is unreadable", "fix or restore it")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > REPOSITORY_FORMAT:
        raise TargetError(
            f"target '{target.name}' holds a hotvm repository of format {version}, "
            f"newer than this hotvm understands ({REPOSITORY_FORMAT})",
            hint,
        )
    return meta


class ImageSets(SetStore[Manifest]):
    """Image sets (`vms/`): the store `hotvm list`, restore, verify, copies and tape read (`repo.images`)."""

    root = "vms"
    manifest_type = Manifest
    manifest_format = MANIFEST_FORMAT
    checksums_since = CHECKSUMS_SINCE  # a format 2 manifest without a checksum is refused, not legacy
    journal_dirs = ("disks",)

    def problem(self, manifest: Manifest, path: str) -> str | None:
        return manifest_problem(manifest, path)

    def newest_key(self, manifest: Manifest) -> tuple:
        return (manifest.backup_id,)  # ids sort by start time: the newest backup is the last one started

    def refs(self, manifest: Manifest) -> set[str]:
        return {digest for disk in manifest.disks for digest in disk.digests()}

    def raw_refs(self, body: dict) -> set[str]:
        return {str(pair[1]) for disk in body["disks"] for pair in disk["chunks"]}

    def journal_refs(self, path: str) -> set[str]:
        refs: set[str] = set()
        for entry in self.target.scan(f"{path}/disks"):
            if entry.name.endswith(".json") and TMP_MARK not in entry.name:
                try:
                    record = DiskRecord.model_validate_json(
                        self.repo.read_file(f"{path}/disks/{entry.name}", limit=MANIFEST_MAX))
                except (FileNotFoundError, ValueError, ChecksumMismatch):
                    continue
                refs.update(record.digests())  # a patched chunk lists its base too
        return refs


CHUNKS_DIR = "chunks/"
"""Where every set's chunks live, once per repository (content-addressed: chunks/ab/abcd...)."""


class Repository:
    """The repository on one target, opened with the encryption key its caller resolved (`key`; None for
    an unencrypted repository). Open one with hotvm.formats.opener.open_repository, which resolves the key
    from the target's configuration and closes the target. The key is checked against the marker on first
    use, before any other file is read or written."""

    def __init__(self, target: Target, key: Credential | str | None = None, *, remember: bool = True) -> None:
        """`remember=False`: no identity is kept for this location (a scratch copy of a tape's marker)."""
        self.target = target
        if not isinstance(key, Credential):
            key = Credential(key, "the key given" if key is not None else "no encryption key given")
        self.key = key
        """Never logged, never stored."""
        self.identities = IdentityStore() if remember else None
        own = target.config  # where it is: the target's own configuration
        self.location = location_of(target.url, own.endpoint_url if own else None)
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._opened = False
        self._sealer: Sealer | None = None
        self._chunk_hash = ""
        self._plain_id: chunkid.IdFunction | None = None
        self._encryption: dict | None = None
        self._identity: Identity | None = None
        self.images = ImageSets(self)

    # ---- repository and its encryption
    def _secret(self) -> tuple[str | None, str]:
        """(the encryption secret or None, where it comes from); never logged, never stored."""
        return self.key.value, self.key.source

    def unlock(self) -> bool:
        """Read the marker and set up encryption; False if the target holds no repository (yet).

        Raises a clear error for a wrong key, a missing key, or a key configured for a repository that
        was created without encryption (a downgrade is never accepted silently)."""
        with self._lock:
            if self._opened:
                return True
            meta = read_marker(self.target)
            known = self.identities.get(self.location) if self.identities else None
            if meta is None:
                if known is not None:
                    raise self._vanished()
                return False
            current = Identity.of_marker(self.location, self.target.name, meta)
            if known is not None and known.differences(current):
                raise TargetConfigError(
                    f"the repository on target '{self.target.name}' ({self.location}) is not the one this "
                    f"host used there before: {', '.join(known.differences(current))}",
                    f"find out what replaced it (a wrong mount, a tampered target); if you re-created this "
                    f"repository on purpose, run 'hotvm target forget {self.target.name}'",
                )
            self._open(meta)
            if known is None and self.identities is not None:
                self.identities.remember(current)
            self._identity = current
            self.target.root_known = True
            return True

    def _vanished(self, during: str = "") -> TargetConfigError:
        """A configuration-class error: retrying the step cannot bring the repository back."""
        return TargetConfigError(
            f"target '{self.target.name}' ({self.location}) no longer holds the hotvm repository this host "
            f"used there{during}: {MARKER} is gone (share not mounted, wrong path, deleted?)",
            f"mount or restore it; if you removed that repository on purpose, run "
            f"'hotvm target forget {self.target.name}'",
        )

    def recheck(self, what: str) -> None:
        """Before a write that makes something visible (a journal, a manifest): the marker on the target
        is still the repository this run opened (not unmounted, swapped or re-created meanwhile)."""
        if not self.unlock():
            raise self._vanished(f" (during {what})")
        meta = read_marker(self.target)
        if meta is None:
            raise self._vanished(f" (during {what})")
        assert self._identity is not None
        now = Identity.of_marker(self.location, self.target.name, meta)
        if self._identity.differences(now):
            raise BackupSetError(
                f"the repository on target '{self.target.name}' changed during {what}: "
                f"{', '.join(self._identity.differences(now))} (another first backup created it, or the "
                "target was swapped?)",
                "rerun the backup",
            )

    def _scheme(self, meta: dict) -> str:
        """The chunk id scheme the marker records (older markers: by their encryption); an unknown one
        is refused before anything is read or written."""
        name, entry = self.target.name, meta.get("encryption")
        default = chunkid.LEGACY_PLAIN if entry is None else chunkid.LEGACY_KEYED
        scheme = meta.get("chunk_hash", default)
        if isinstance(entry, dict) and "chunk_hash" not in meta:
            scheme = entry.get("chunk_id", default)
        if scheme not in chunkid.KNOWN:
            raise TargetError(
                f"the hotvm repository on target '{name}' ({self.location}) names its chunks by "
                f"{str(scheme)[:40]!r}, which this hotvm does not know",
                "upgrade hotvm",
            )
        keyed = scheme in chunkid.KEYED
        if keyed != (entry is not None) or (isinstance(entry, dict) and entry.get("chunk_id") != scheme):
            raise BackupSetError(
                f"{MARKER} on target '{name}' names chunks by {scheme!r}, which does not fit its "
                f"encryption entry", "the marker is damaged; restore it from a copy",
            )
        return str(scheme)

    def _open(self, meta: dict) -> None:
        name = self.target.name
        entry = meta.get("encryption")
        secret, source = self._secret()
        scheme = self._scheme(meta)
        if entry is None:
            if meta.get("format_version", 0) == ENCRYPTED_FORMAT:
                raise BackupSetError(
                    f"{MARKER} on target '{name}' says format {meta['format_version']} but has no "
                    "encryption entry", "the marker is damaged; restore it from a copy",
                )
            if secret is not None:
                raise TargetConfigError(
                    f"target '{name}' holds an unencrypted hotvm repository, but its configuration sets an "
                    "encryption key",
                    "encryption cannot be added to an existing repository: send encrypted backups to a new "
                    "target or prefix, or remove encryption_key_env/encryption_key_secret for this one",
                )
            self._plain_id = chunkid.id_function(scheme)
        else:
            if secret is None:
                raise TargetConfigError(
                    f"target '{name}' is encrypted: set encryption_key_env/secret",
                    "name the environment variable (encryption_key_env) or the Prefect Secret block "
                    "(encryption_key_secret) that holds the key this repository was created with",
                )
            from hotvm.formats.crypto import Sealer, open_encryption

            try:
                keys = open_encryption(secret, entry)
            except (ValueError, KeyError, TypeError) as exc:
                raise BackupSetError(
                    f"{MARKER} on target '{name}': its encryption entry cannot be used ({exc})",
                    "upgrade hotvm, or restore the marker from a copy",
                ) from None
            if keys is None:
                raise TargetConfigError(
                    f"wrong encryption key for target '{name}'",
                    f"the key from {source} is not the one this repository was created with",
                )
            self._sealer = Sealer(keys, scheme)
            self._encryption = dict(entry)
        self._chunk_hash = scheme
        self._opened = True

    def ensure(self) -> None:
        """Create the repository on first use (encrypted if the target configures a key); refuse a
        repository written by a newer format, a wrong or missing key, and a change of encryption."""
        if self.unlock():
            return
        with self.identities.creating(self.location) if self.identities else nullcontext():
            if self.unlock():  # another first backup on this host created it meanwhile
                return
            self._create()

    def _create(self) -> None:
        """First use: no marker on the target and no identity remembered for it on this host."""
        self.target.check()
        secret, _ = self._secret()
        meta: dict = {"format": "hotvm", "format_version": REPOSITORY_FORMAT, "id": secrets.token_hex(16),
                      "chunk_hash": chunkid.NEW_PLAIN}
        if secret is not None:
            from hotvm.formats.crypto import CHUNK_ID, new_encryption

            entry, _keys = new_encryption(secret)
            meta.update(chunk_hash=CHUNK_ID, encryption=entry)
        self.target.write_bytes(MARKER, json.dumps(meta, indent=2).encode())
        # Read it back: if another first backup wrote its own marker meanwhile, use the one that won.
        if not self.unlock():
            raise TargetError(
                f"target '{self.target.name}' does not show {MARKER} right after writing it",
                "check the target (an eventually consistent store?)",
            )

    @property
    def encrypted(self) -> bool:
        self.unlock()
        return self._sealer is not None

    @property
    def chunk_hash(self) -> str:
        """How this repository names chunks (hotvm/formats/chunkid.py), as its marker records."""
        self._read_sealer()
        return self._chunk_hash

    def _read_sealer(self) -> Sealer | None:
        """Nothing is read from a target without a repository (a planted set in an empty or unmounted
        directory is never taken as plain data)."""
        if not self.unlock():
            raise BackupSetError(
                f"target '{self.target.name}' ({self.location}) holds no hotvm repository ({MARKER} missing)",
                "check the target's URL and that it is mounted",
            )
        return self._sealer

    def _write_sealer(self) -> Sealer | None:
        """Writes never happen before the repository's encryption is known: create it if need be."""
        if not self.unlock():
            with self._create_lock:
                if not self.unlock():
                    self.ensure()
        return self._sealer

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        """A chunk's name under the repository's own scheme (`chunk_hash`): BLAKE3 (older: sha256) of its
        plain content, or in an encrypted repository the keyed hash under the repository's id key (names
        do not reveal content hashes; identical chunks still share a name)."""
        sealer = self._write_sealer()
        if sealer is not None:
            return sealer.chunk_id(data)
        assert self._plain_id is not None
        return self._plain_id(data)

    def seal(self, path: str, data: bytes | bytearray | memoryview) -> bytes:
        """What is stored at `path` for these plain bytes (encrypted, with the path as AAD, if need be)."""
        sealer = self._write_sealer()
        return sealer.seal(path, data) if sealer else bytes(data)

    def open_blob(self, path: str, blob: bytes | memoryview, what: str) -> bytes | memoryview:
        """The plain bytes of the file at `path` read as `blob`; ChecksumMismatch naming `what` if it
        fails authentication (an encrypted repository never hands out unauthenticated bytes)."""
        sealer = self._read_sealer()
        return sealer.open(path, blob, what) if sealer else blob

    def write_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        self.target.write_bytes(path, self.seal(path, data))

    def read_file(self, path: str, what: str | None = None, *, limit: int = DOCUMENT_MAX) -> bytes:
        """Plain bytes of a file of at most `limit` bytes as stored (formats/bounds.py; a larger one is
        TamperedBlob, read no further); FileNotFoundError passes through."""
        blob = self.target.read_bytes(path, limit)
        return self.open_blob(path, blob, what or self.target.display(path))

    # ---- chunks
    @staticmethod
    def chunk_path(digest: str) -> str:
        return f"{CHUNKS_DIR}{digest[:2]}/{digest}"

    def has_chunk(self, digest: str, for_write: bool = False) -> bool:
        """`for_write`: asked only to decide whether to put_chunk it (the target may skip the lookup where the
        chunk cannot be there yet: Target.exists_for_write)."""
        path = self.chunk_path(digest)
        return self.target.exists_for_write(path) if for_write else self.target.exists(path)

    def put_chunk(self, digest: str, compressed: bytes) -> int:
        """Store a chunk's zstd frame (encrypted in an encrypted repository); returns the bytes stored."""
        path = self.chunk_path(digest)
        blob = self.seal(path, compressed)
        self.target.write_bytes(path, blob)
        return len(blob)

    def get_chunk(self, digest: str, plain: int, into: bytearray | None = None) -> bytes | memoryview:
        """A chunk's zstd frame, authenticated (decrypted) in an encrypted repository; `plain`: the most
        plain bytes it may hold (its disk's chunk_size), which bounds what is read (bounds.chunk_max). With
        `into`, the target may read it into that buffer (Target.read_into): the frame is then a view of it."""
        path = self.chunk_path(digest)
        limit = chunk_max(plain)
        try:
            if into is None:
                blob = self.target.read_bytes(path, limit)
            else:
                blob = self.target.read_into(path, into, limit)
        except FileNotFoundError:
            raise BackupSetError(
                f"chunk {digest[:16]}… is missing from target '{self.target.name}'",
                "the repository is damaged; restore from another backup or copy",
            ) from None
        return self.open_blob(path, blob, f"chunk {digest[:16]}… on target '{self.target.name}'")

    def read_raw_chunk(self, digest: str, out: memoryview, length: int) -> memoryview | None:
        """The content of a chunk stored as raw zstd blocks only (incompressible data), read straight into
        out[:length] (formats/rawframe.py); None where that does not apply (encrypted repository, a target
        without scatter reads, a compressed or unexpected frame): then read it with get_chunk. The bytes
        are NOT verified here: the caller checks them against the chunk's name like any other."""
        if self._read_sealer() is not None or length > len(out):
            return None
        scratch = memoryview(bytearray(HEAD_MAX + 3 * (length // BLOCK_MAX + 1) + 4))
        seen: list[tuple[bytes, RawLayout]] = []

        def plan(head: bytes, size: int) -> list[memoryview] | None:
            layout = raw_layout(head, size, length)
            if layout is None or layout.blocks > MAX_SCATTER_BLOCKS:
                return None
            seen.append((head, layout))
            return layout.views(out, scratch)

        try:
            if not self.target.read_scatter(self.chunk_path(digest), plan):
                return None
        except FileNotFoundError:
            return None  # get_chunk says it is missing
        head, layout = seen[0]
        return out[:length] if layout.check(head, scratch) else None

    # ---- image sets (repo.images; these keep the older call sites working)
    @staticmethod
    def set_dir(vm: str, backup_id: str) -> str:
        return ImageSets.set_dir(vm, backup_id)

    def set_path(self, vm: str, backup_id: str) -> str:
        return self.images.set_path(vm, backup_id)

    def disk_record_path(self, vm: str, backup_id: str, device: str) -> str:
        return f"{self.set_dir(vm, backup_id)}/disks/{target_name(device)}.json"

    def write_disk_record(self, vm: str, backup_id: str, record: DiskRecord) -> None:
        self.recheck(f"backup {vm}/{backup_id}")
        self.write_file(
            self.disk_record_path(vm, backup_id, record.device),
            record.with_checksum().model_dump_json(indent=1).encode(),
        )

    def read_disk_record(self, vm: str, backup_id: str, device: str) -> DiskRecord | None:
        """The journaled export of a disk, if it can be trusted; None means: export it again."""
        path = self.disk_record_path(vm, backup_id, device)
        try:
            record = DiskRecord.model_validate_json(self.read_file(path, limit=MANIFEST_MAX))
        except FileNotFoundError:
            return None
        except (ValidationError, ChecksumMismatch):
            return None  # torn, foreign or unauthentic file: export it again
        if record.device != device or record.checksum_problem(legacy=False):
            return None  # another disk's, rotted, or from a hotvm without checksums
        return record.model_copy(update={"checksum": None})  # the checksum belongs to the file, not the disk

    def write_blob(self, vm: str, backup_id: str, name: str, data: bytes) -> str:
        path = f"{self.set_path(vm, backup_id)}/{name}"
        self.write_file(path, data)
        return path

    def read_blob(self, vm: str, backup_id: str, name: str, limit: int = CONFIG_ARCHIVE_MAX) -> bytes:
        """A file of a set (its config archive: at most `limit` bytes as stored)."""
        try:
            path = f"{self.set_path(vm, backup_id)}/{name}"
            return self.read_file(path, f"{name} of backup {vm}/{backup_id}", limit=limit)
        except FileNotFoundError:
            raise BackupSetError(
                f"{name} missing from backup {vm}/{backup_id} on '{self.target.name}'",
                "the set is damaged; use another backup",
            ) from None

    def mark_started(self, vm: str, backup_id: str, host: str) -> None:
        self.images.mark_started(vm, backup_id, host)

    def read_started(self, path: str) -> dict:
        return self.images.read_started(path)

    def commit_manifest(self, manifest: Manifest) -> str:
        """The last write of a backup: from here on the set is complete and restorable."""
        self.images.commit_manifest(manifest)
        return self.target.display(self.set_dir(manifest.vm, manifest.backup_id))

    def parse_manifest(self, path: str) -> Manifest:
        return self.images.parse_manifest(path)

    def load_manifest(self, vm: str, backup_id: str) -> Manifest:
        return self.images.load_manifest(vm, backup_id)

    # ---- holds: sets a long reader (a tape copy) still needs; prune keeps them
    HOLD_MAX_AGE = dt.timedelta(hours=24)

    @contextmanager
    def hold(self, holder: str, sets: list[tuple[str, str]]) -> Iterator[None]:
        """While the block runs, prune keeps these (vm, backup_id) sets, whatever its policy says."""
        path = f"holds/{secrets.token_hex(8)}.json"
        body = {"holder": holder, "sets": sets, "created": dt.datetime.now(dt.UTC).isoformat()}
        self.write_file(path, json.dumps(body).encode())
        try:
            yield
        finally:
            self.target.delete(path)

    def holds(self, now: dt.datetime | None = None) -> dict[tuple[str, str], str]:
        """(vm, backup_id) -> who holds it. A hold older than HOLD_MAX_AGE is a killed reader's: ignored."""
        now = now or dt.datetime.now(dt.UTC)
        held: dict[tuple[str, str], str] = {}
        for name in self.target.listdir("holds"):
            if not name.endswith(".json") or ".tmp-" in name:
                continue
            try:
                body = json.loads(self.read_file(f"holds/{name}"))
                if now - dt.datetime.fromisoformat(body["created"]) > self.HOLD_MAX_AGE:
                    continue
                sets = [(str(vm), str(backup_id)) for vm, backup_id in body["sets"]]
                holder = str(body["holder"])
            except (FileNotFoundError, ValueError, TypeError, KeyError, ChecksumMismatch):
                continue  # a torn or foreign hold holds nothing
            for key in sets:
                held[key] = holder
        return held

    def list_vms(self) -> list[str]:
        return self.images.vms()

    def list_sets(self, vm: str | None = None) -> list[SetEntry[Manifest]]:
        return self.images.list_sets(vm)

    def latest(self, vm: str) -> Manifest:
        """The newest complete image set of `vm`, or BackupSetError (naming damaged manifests, if any)."""
        manifest = self.images.latest(vm)
        if manifest is None:
            damaged = [e for e in self.list_sets(vm)
                       if self.target.exists(f"{self.images.set_dir(vm, e.backup_id)}/manifest.json")]
            note = f" ({len(damaged)} set(s) with a damaged manifest: run 'hotvm check')" if damaged else ""
            raise BackupSetError(
                f"no complete backup of VM '{vm}' on target '{self.target.name}'{note}",
                f"run 'hotvm backup {vm}' first, or pick another --target",
            )
        return manifest

    def find(self, vm: str, backup_id: str | None) -> Manifest:
        return self.load_manifest(vm, backup_id) if backup_id else self.latest(vm)

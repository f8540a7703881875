"""Layout of a hotvm repository on a target (docs/format.md):

    hotvm-repository.json                 format marker, version and random repository id
    chunks/<h[:2]>/<h>                    zstd-compressed chunk, named by sha256 of its plain content
    vms/<vm>/<backup_id>/disks/<dev>.json one exported disk (written when its export finished: resume journal)
    vms/<vm>/<backup_id>/config.tar.zst   the VM's config files and description
    vms/<vm>/<backup_id>/manifest.json    written last: a set without it is incomplete and never restored

Chunks are shared by every set in the repository, so a rerun after a failure and next week's backup only
upload what is not there yet.

An encrypted repository (format 2, docs/format.md "Encryption") names chunks by HMAC-SHA256 under a key
and stores every file but the marker AES-256-GCM encrypted; this class is the only place that reads or
writes file contents, so the rest of hotvm sees plain bytes either way.

A target is untrusted (docs/security.md): every manifest and disk record carries a checksum and must lie
where it says it belongs, and the repository's identity is remembered per target location
(hotvm/formats/identity.py) and checked on every open and before a set is made visible.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from hotvm.errors import BackupSetError, ChecksumMismatch, TargetConfigError, TargetError
from hotvm.formats.identity import Identity, IdentityStore, location_of
from hotvm.formats.manifest import BACKUP_ID, CHECKSUMS_SINCE, MANIFEST_FORMAT, DiskRecord, Manifest
from targets.base import Target

if TYPE_CHECKING:
    from hotvm.config import TargetConfig
    from hotvm.formats.crypto import Sealer

MARKER = "hotvm-repository.json"
ENCRYPTED_FORMAT = 2
"""Repository format of an encrypted repository: a hotvm that predates encryption refuses it (and so never
writes plain chunks into it); an unencrypted repository written before format 3 is format 1. Both are
still read and written (their marker is never rewritten: its digest is their remembered id)."""
REPOSITORY_FORMAT = 3
"""The newest repository format this hotvm reads and writes: 3 = the marker has a random `id`, manifests
and disk records carry checksums, names that need cleaning get a hash suffix (encrypted or not: the
marker's `encryption` entry says). Older hotvm refuses it instead of mistaking new sets for damaged ones."""
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_CLEAN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


def safe_name(name: str) -> str:
    """The lossy single path component older hotvm used for VM and device names (`x:y` and `x_y` both
    became `x_y`): still looked at to find sets it wrote, never used to name anything new."""
    cleaned = _SAFE.sub("_", name).lstrip(".")
    return cleaned or "_"


def target_name(name: str) -> str:
    """A VM or device name as one path component, one-to-one: a name that is already a clean component
    stays as it is (so older sets of such VMs are where they always were); any other becomes its cleaned
    form, '~' and a hash of the real name ('~' never occurs in a clean name, so no two names meet)."""
    if _CLEAN.match(name):
        return name
    return f"{safe_name(name)[:100]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def vm_dirs(vm: str) -> list[str]:
    """Directories that may hold sets of `vm`: its own, then the one older hotvm used, if different."""
    own, legacy = target_name(vm), safe_name(vm)
    return [own] if own == legacy else [own, legacy]


def checked_backup_id(backup_id: str) -> str:
    """A backup id given by a caller or read from a listing, before it becomes a path component."""
    if not isinstance(backup_id, str) or not BACKUP_ID.match(backup_id):
        raise BackupSetError(
            f"{str(backup_id)[:80]!r} is not a backup id",
            "backup ids look like 20260101T020000Z-ab12 (hotvm list)",
        )
    return backup_id


class DamagedManifest(ChecksumMismatch, ValueError):
    """A manifest that does not parse, fails its checksum or lies elsewhere than it says: one message naming
    the set and the first problem (a ValueError too, for callers that catch pydantic's errors)."""


def parse_model(model: type, blob: bytes, what: str, target: str):  # noqa: ANN201 - an instance of model
    """`model` from JSON read off a target, or DamagedManifest naming `what` and the first invalid field."""
    try:
        return model.model_validate_json(blob)
    except ValidationError as exc:
        raise DamagedManifest(
            f"{what} on target '{target}' is unreadable: {_first_error(exc)}",
            "the set is damaged or was tampered with; use another backup (hotvm check lists them)",
        ) from None


def location_problem(path: str, vm: str, backup_id: str) -> str | None:
    """Why a manifest read from `path` (<root>/<dir>/<id>) does not belong there, or None: a set copied or
    renamed on the target must not pass for another VM's or another time's backup."""
    parts = path.strip("/").split("/")
    if len(parts) < 3 or parts[-1] != backup_id:
        return f"it says backup {backup_id!r} but lies in {path}"
    if parts[-2] not in (target_name(vm), safe_name(vm)):
        return f"it says VM {vm!r} but lies in {path}"
    return None


def manifest_problem(manifest: Manifest, path: str) -> str | None:
    """Why a manifest read from `path` cannot be trusted (checksum, its disks' checksums, location)."""
    problem = manifest.checksum_problem(legacy=manifest.format_version < CHECKSUMS_SINCE)
    if problem:
        return problem
    for disk in manifest.disks:
        if disk.checksum is not None and disk.checksum_problem(legacy=True):
            return f"disk '{disk.device}': {disk.checksum_problem(legacy=True)}"
    return location_problem(path, manifest.vm, manifest.backup_id)


def new_backup_id(now: dt.datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def read_marker(target: Target, hint: str = "upgrade hotvm") -> dict | None:
    """The repository marker, None if the target holds no repository; refuses a newer format."""
    try:
        meta = json.loads(target.read_bytes(MARKER))
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


@dataclass(frozen=True)
class SetEntry:
    vm: str
    backup_id: str
    manifest: Manifest | None

    @property
    def complete(self) -> bool:
        return self.manifest is not None


class Repository:
    """The repository on one target. The encryption key comes from the target's configuration
    (`config`, else the one open_target attached to the target); it is resolved and checked against the
    marker on first use, before any other file is read or written."""

    def __init__(self, target: Target, config: TargetConfig | None = None, *, remember: bool = True) -> None:
        """`remember=False`: no identity is kept for this location (a scratch copy of a tape's marker)."""
        self.target = target
        self.config = config if config is not None else target.config
        self.identities = IdentityStore() if remember else None
        own = target.config  # where it is: the target's own configuration (`config` may only lend the key)
        self.location = location_of(target.url, own.endpoint_url if own else None)
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._opened = False
        self._sealer: Sealer | None = None
        self._encryption: dict | None = None
        self._identity: Identity | None = None

    # ---- repository and its encryption
    def _secret(self) -> tuple[str | None, str]:
        """(the encryption secret or None, where it comes from); never logged, never stored."""
        if self.config is None:
            return None, "no target configuration"
        from targets.secrets import encryption_key

        cred = encryption_key(self.config)
        return cred.value, cred.source

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

    def _open(self, meta: dict) -> None:
        name = self.target.name
        entry = meta.get("encryption")
        secret, source = self._secret()
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
            self._sealer = Sealer(keys)
            self._encryption = dict(entry)
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
                      "chunk_hash": "sha256"}
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
        return "hmac-sha256" if self.encrypted else "sha256"

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
        """A chunk's name: sha256 of its plain content, or in an encrypted repository HMAC-SHA256 under the
        repository's id key (names do not reveal content hashes; identical chunks still share a name)."""
        sealer = self._write_sealer()
        return sealer.chunk_id(data) if sealer else hashlib.sha256(data).hexdigest()

    def seal(self, path: str, data: bytes | bytearray | memoryview) -> bytes:
        """What is stored at `path` for these plain bytes (encrypted, with the path as AAD, if need be)."""
        sealer = self._write_sealer()
        return sealer.seal(path, data) if sealer else bytes(data)

    def open_blob(self, path: str, blob: bytes, what: str) -> bytes:
        """The plain bytes of the file at `path` read as `blob`; ChecksumMismatch naming `what` if it
        fails authentication (an encrypted repository never hands out unauthenticated bytes)."""
        sealer = self._read_sealer()
        return sealer.open(path, blob, what) if sealer else blob

    def write_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        self.target.write_bytes(path, self.seal(path, data))

    def read_file(self, path: str, what: str | None = None) -> bytes:
        """Plain bytes of a file (FileNotFoundError passes through)."""
        return self.open_blob(path, self.target.read_bytes(path), what or self.target.display(path))

    # ---- chunks
    @staticmethod
    def chunk_path(digest: str) -> str:
        return f"chunks/{digest[:2]}/{digest}"

    def has_chunk(self, digest: str) -> bool:
        return self.target.exists(self.chunk_path(digest))

    def put_chunk(self, digest: str, compressed: bytes) -> int:
        """Store a chunk's zstd frame (encrypted in an encrypted repository); returns the bytes stored."""
        path = self.chunk_path(digest)
        blob = self.seal(path, compressed)
        self.target.write_bytes(path, blob)
        return len(blob)

    def get_chunk(self, digest: str) -> bytes:
        """A chunk's zstd frame, authenticated (decrypted) in an encrypted repository."""
        path = self.chunk_path(digest)
        try:
            blob = self.target.read_bytes(path)
        except FileNotFoundError:
            raise BackupSetError(
                f"chunk {digest[:16]}… is missing from target '{self.target.name}'",
                "the repository is damaged; restore from another backup or copy",
            ) from None
        return self.open_blob(path, blob, f"chunk {digest[:16]}… on target '{self.target.name}'")

    # ---- sets
    @staticmethod
    def set_dir(vm: str, backup_id: str) -> str:
        """Where a new set of `vm` is written (one directory per VM name, see target_name)."""
        return f"vms/{target_name(vm)}/{checked_backup_id(backup_id)}"

    def set_path(self, vm: str, backup_id: str) -> str:
        """Where the set is: its own directory, or the one older hotvm wrote it to."""
        dirs = [f"vms/{d}/{checked_backup_id(backup_id)}" for d in vm_dirs(vm)]
        if len(dirs) > 1 and not self.target.listdir(dirs[0]) and self.target.listdir(dirs[1]):
            return dirs[1]
        return dirs[0]

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
            record = DiskRecord.model_validate_json(self.read_file(path))
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

    def read_blob(self, vm: str, backup_id: str, name: str) -> bytes:
        try:
            path = f"{self.set_path(vm, backup_id)}/{name}"
            return self.read_file(path, f"{name} of backup {vm}/{backup_id}")
        except FileNotFoundError:
            raise BackupSetError(
                f"{name} missing from backup {vm}/{backup_id} on '{self.target.name}'",
                "the set is damaged; use another backup",
            ) from None

    def mark_started(self, vm: str, backup_id: str, host: str) -> None:
        """Make an unfinished set visible (list shows it incomplete; the next run resumes it)."""
        path = f"{self.set_dir(vm, backup_id)}/started.json"
        if not self.target.exists(path):
            body = {"vm": vm, "backup_id": backup_id, "host": host, "started_at": dt.datetime.now(dt.UTC)}
            self.write_file(path, json.dumps(body, default=str).encode())

    def read_started(self, path: str) -> dict:
        """started.json of the set at `path` (vms/<vm>/<id>); {} if absent, torn or unauthentic."""
        try:
            body = json.loads(self.read_file(f"{path}/started.json"))
        except (FileNotFoundError, ValueError, ChecksumMismatch):
            return {}
        return body if isinstance(body, dict) else {}

    def commit_manifest(self, manifest: Manifest) -> str:
        """The last write of a backup: from here on the set is complete and restorable."""
        set_dir = self.set_dir(manifest.vm, manifest.backup_id)
        # The marker is read again: a target unmounted, swapped or re-created during the backup (or a
        # first backup that lost the race to create an encrypted repository) never gets a complete set.
        self.recheck(f"backup {manifest.vm}/{manifest.backup_id}")
        update: dict = {"format_version": MANIFEST_FORMAT}
        if self.encrypted:
            update["chunk_hash"] = "hmac-sha256"
        manifest = manifest.model_copy(update=update).with_checksum()
        self.write_file(f"{set_dir}/manifest.json", manifest.model_dump_json(indent=1).encode())
        return self.target.display(set_dir)

    def parse_manifest(self, path: str) -> Manifest:
        """The manifest of the set at `path`: FileNotFoundError if it has none, ValueError (a pydantic
        ValidationError) or ChecksumMismatch if it cannot be trusted (checksum, or it lies elsewhere than
        it says)."""
        blob = self.read_file(f"{path}/manifest.json", f"manifest of {path}")
        manifest = parse_model(Manifest, blob, f"manifest of {path}", self.target.name)
        problem = manifest_problem(manifest, path)
        if problem:
            raise DamagedManifest(
                f"manifest of {path} on target '{self.target.name}': {problem}",
                "the set is damaged or was tampered with; use another backup (hotvm check lists them)",
            )
        return manifest

    def load_manifest(self, vm: str, backup_id: str) -> Manifest:
        other = None
        for vm_dir in vm_dirs(vm):
            try:
                manifest = self.parse_manifest(f"vms/{vm_dir}/{checked_backup_id(backup_id)}")
            except FileNotFoundError:
                continue
            if manifest.vm == vm:
                return manifest
            other = manifest.vm
        if other is not None:
            raise BackupSetError(
                f"backup {backup_id} on target '{self.target.name}' is of VM {other!r}, not {vm!r}",
                f"run 'hotvm list {vm}' to see that VM's own backups",
            )
        raise BackupSetError(
            f"backup {vm}/{backup_id} on target '{self.target.name}' is not complete (no manifest)",
            "run 'hotvm list' to see complete backups; rerun the backup to finish this one",
        )

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
        return self.target.listdir("vms")

    def list_sets(self, vm: str | None = None) -> list[SetEntry]:
        """Sets of every VM (or of `vm` only: never another VM's that shares an older directory)."""
        if not self.unlock():  # a wrong or missing key says so, not "no backups"
            return []
        entries = []
        for vm_dir in vm_dirs(vm) if vm else self.list_vms():
            for backup_id in self.target.listdir(f"vms/{vm_dir}"):
                if ".tmp-" in backup_id:
                    continue
                try:
                    manifest: Manifest | None = self.parse_manifest(f"vms/{vm_dir}/{backup_id}")
                except (FileNotFoundError, ValueError, BackupSetError):
                    manifest = None
                if manifest is not None:
                    owner = manifest.vm
                else:  # incomplete: whose it is, as its started.json says (a name, never a path)
                    named = self.read_started(f"vms/{vm_dir}/{backup_id}").get("vm")
                    owner = named if isinstance(named, str) and vm_dir in vm_dirs(named) else vm_dir
                if vm is not None and owner != vm:
                    continue
                entries.append(SetEntry(owner, backup_id, manifest))
        return sorted(entries, key=lambda e: (e.vm, e.backup_id))

    def latest(self, vm: str) -> Manifest:
        entries = self.list_sets(vm)
        complete = [e for e in entries if e.manifest]
        if not complete:
            damaged = [e for e in entries
                       if self.target.exists(f"vms/{target_name(vm)}/{e.backup_id}/manifest.json")]
            note = f" ({len(damaged)} set(s) with a damaged manifest: run 'hotvm check')" if damaged else ""
            raise BackupSetError(
                f"no complete backup of VM '{vm}' on target '{self.target.name}'{note}",
                f"run 'hotvm backup {vm}' first, or pick another --target",
            )
        return complete[-1].manifest  # type: ignore[return-value]

    def find(self, vm: str, backup_id: str | None) -> Manifest:
        return self.load_manifest(vm, backup_id) if backup_id else self.latest(vm)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg

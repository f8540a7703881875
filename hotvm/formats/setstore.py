"""One generic set store: sets of one kind under one root prefix of a repository, each with a typed manifest.

    <root>/<vm>/<backup_id>/started.json    an unfinished set is visible (list shows it, prune keeps it)
    <root>/<vm>/<backup_id>/...             the kind's own files (disk records, volume journals, ...)
    <root>/<vm>/<backup_id>/manifest.json   written last: only then is the set complete

Image sets (`vms/`, hotvm/formats/repository.py ImageSets, `repo.images`) and file sets (`files/`,
hotvm/files/filesets.py FileSets) are this store with their own root and manifest type, and so is any
later kind. A separate root per kind keeps one kind's code from mistaking another kind's set for its own.

Everything read back is hostile input (docs/security.md): a manifest is size-bounded before it is opened
or parsed, validated by its pydantic model, checked against its own checksum, and must lie where it says
it belongs (a set copied or renamed on the target never passes for another VM's or another time's).
"""

from __future__ import annotations

import abc
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from pydantic import ValidationError

from hotvm.errors import BackupSetError, ChecksumMismatch, TamperedBlob
from hotvm.formats.bounds import MAX_MANIFEST_BYTES, SEAL_OVERHEAD
from hotvm.formats.manifest import BACKUP_ID, Checksummed, utcnow

if TYPE_CHECKING:
    from hotvm.formats.repository import Repository

TMP_MARK = ".tmp-"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_CLEAN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


# --------------------------------------------------------------------------- names on the target


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


# --------------------------------------------------------------------------- reading manifests


class DamagedManifest(ChecksumMismatch, ValueError):
    """A manifest that does not parse, fails its checksum or lies elsewhere than it says: one message naming
    the set and the first problem (a ValueError too, for callers that catch pydantic's errors)."""


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


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


M = TypeVar("M", bound=Checksummed)


@dataclass(frozen=True)
class SetEntry(Generic[M]):
    """One set as `list_sets` shows it: complete when its manifest could be read and trusted."""

    vm: str
    backup_id: str
    manifest: M | None
    path: str = ""

    @property
    def complete(self) -> bool:
        return self.manifest is not None


class SetStore(abc.ABC, Generic[M]):
    """Sets of one kind in one repository: the repository seals and opens every file; this store knows
    where a kind's sets lie, how a set becomes complete, and how its manifest is read back and trusted.

    A kind sets `root`, `manifest_type` and `manifest_format` (the newest it writes; older ones are read
    as legacy: no checksum), and may add checks (`problem`, `before_commit`) and chunk references (for
    prune's mark phase: `refs`, `raw_refs`, `journal_refs`)."""

    root: ClassVar[str]
    manifest_type: ClassVar[type]
    manifest_format: ClassVar[int]
    checksums_since: ClassVar[int | None] = None
    """The first format that carries checksums (None: every format this kind wrote); older ones are legacy."""
    noun: ClassVar[str] = "backup"
    """How messages name a set of this kind ("backup web01/…", "file set web01/…")."""
    list_hint: ClassVar[str] = "hotvm list"
    plural: ClassVar[str] = "backups"
    journal_dirs: ClassVar[tuple[str, ...]] = ()
    """Sub-directories an unfinished set journals into (their files are its signs of life)."""
    max_manifest_bytes: ClassVar[int] = MAX_MANIFEST_BYTES

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.target = repo.target

    # ---- where sets lie
    @classmethod
    def set_dir(cls, vm: str, backup_id: str) -> str:
        """Where a new set of `vm` is written (one directory per VM name, see target_name)."""
        return f"{cls.root}/{target_name(vm)}/{checked_backup_id(backup_id)}"

    def set_path(self, vm: str, backup_id: str) -> str:
        """Where the set is: its own directory, or the one older hotvm wrote it to."""
        dirs = [f"{self.root}/{d}/{checked_backup_id(backup_id)}" for d in vm_dirs(vm)]
        if len(dirs) > 1 and not self.target.listdir(dirs[0]) and self.target.listdir(dirs[1]):
            return dirs[1]
        return dirs[0]

    def set_paths(self, vm: str | None = None) -> Iterator[str]:
        """`<root>/<vm dir>/<backup_id>` of every set (of one VM), from fresh listings."""
        dirs = vm_dirs(vm) if vm else [e.name for e in self.target.scan(self.root) if e.is_dir is not False]
        for vm_dir in dirs:
            for entry in self.target.scan(f"{self.root}/{vm_dir}"):
                if entry.is_dir is not False and TMP_MARK not in entry.name:
                    yield f"{self.root}/{vm_dir}/{entry.name}"

    def vms(self) -> list[str]:
        """Directory names under the root (VM names, cleaned: see target_name)."""
        return self.target.listdir(self.root)

    # ---- writing, in the order a backup writes
    def mark_started(self, vm: str, backup_id: str, host: str) -> None:
        """Make an unfinished set visible (list shows it incomplete; the next run resumes it)."""
        path = f"{self.set_dir(vm, backup_id)}/started.json"
        if not self.target.exists(path):
            body = {"vm": vm, "backup_id": backup_id, "host": host, "started_at": utcnow().isoformat()}
            self.repo.write_file(path, json.dumps(body).encode())

    def before_commit(self, manifest: M) -> None:
        """A kind's last check before its manifest is written (e.g. every chunk it lists is stored)."""

    def commit_manifest(self, manifest: M) -> M:
        """The last write of a set (one atomic put): from here on it is complete. Returns it as written."""
        self.before_commit(manifest)
        # The marker is read again: a target unmounted, swapped or re-created during the backup (or a
        # first backup that lost the race to create an encrypted repository) never gets a complete set.
        self.repo.recheck(f"{self.noun} {manifest.vm}/{manifest.backup_id}")  # type: ignore[attr-defined]
        update: dict = {"format_version": self.manifest_format, "chunk_hash": self.repo.chunk_hash}  # type: ignore[attr-defined]
        manifest = manifest.model_copy(update=update).with_checksum()
        set_dir = self.set_dir(manifest.vm, manifest.backup_id)  # type: ignore[attr-defined]
        self.repo.write_file(f"{set_dir}/manifest.json", manifest.model_dump_json(indent=1).encode())
        return manifest

    # ---- reading
    def read_started(self, path: str) -> dict:
        """started.json of the set at `path`; {} if absent, torn or unauthentic."""
        try:
            body = json.loads(self.repo.read_file(f"{path}/started.json"))
        except (FileNotFoundError, ValueError, ChecksumMismatch):
            return {}
        return body if isinstance(body, dict) else {}

    def read_manifest_bytes(self, path: str) -> bytes:
        """The plain bytes of the manifest of the set at `path`, bounded in size before they are opened."""
        what = f"manifest of {path}"
        limit = self.max_manifest_bytes + SEAL_OVERHEAD
        try:
            blob = self.target.read_bytes(f"{path}/manifest.json", limit)
        except TamperedBlob as exc:  # larger than limit (never read further), or not a file
            raise DamagedManifest(f"{what}: {exc.message}", exc.hint) from None
        return self.repo.open_blob(f"{path}/manifest.json", blob, what)

    def problem(self, manifest: M, path: str) -> str | None:
        """Why a manifest read from `path` cannot be trusted: its checksum, or it lies elsewhere."""
        since = self.checksums_since or self.manifest_format
        legacy = manifest.format_version < since  # type: ignore[attr-defined]
        return manifest.checksum_problem(legacy=legacy) or location_problem(
            path, manifest.vm, manifest.backup_id  # type: ignore[attr-defined]
        )

    def parse_manifest(self, path: str) -> M:
        """The manifest of the set at `path`: FileNotFoundError if it has none; DamagedManifest (a
        ValueError) or ChecksumMismatch if it cannot be trusted."""
        blob = self.read_manifest_bytes(path)
        manifest = parse_model(self.manifest_type, blob, f"manifest of {path}", self.target.name)
        problem = self.problem(manifest, path)
        if problem:
            raise DamagedManifest(
                f"manifest of {path} on target '{self.target.name}': {problem}",
                "the set is damaged or was tampered with; use another backup (hotvm check lists them)",
            )
        return manifest

    def load_manifest(self, vm: str, backup_id: str) -> M:
        """The complete set `backup_id` of `vm`, or BackupSetError saying why not."""
        other = None
        for vm_dir in vm_dirs(vm):
            try:
                manifest = self.parse_manifest(f"{self.root}/{vm_dir}/{checked_backup_id(backup_id)}")
            except FileNotFoundError:
                continue
            if manifest.vm == vm:  # type: ignore[attr-defined]
                return manifest
            other = manifest.vm  # type: ignore[attr-defined]
        if other is not None:
            raise BackupSetError(
                f"{self.noun} {backup_id} on target '{self.target.name}' is of VM {other!r}, not {vm!r}",
                f"run '{self.list_hint} {vm}' to see that VM's own {self.plural}",
            )
        raise BackupSetError(
            f"{self.noun} {vm}/{backup_id} on target '{self.target.name}' is not complete (no manifest)",
            f"run '{self.list_hint}' to see complete {self.plural}; rerun the backup to finish this one",
        )

    def owner(self, path: str, manifest: M | None) -> str:
        """Whose set lies at `path`: its manifest's VM, else (incomplete) the VM its started.json names if
        that VM's sets lie in this directory (a name, never a path), else the directory's name."""
        if manifest is not None:
            return manifest.vm  # type: ignore[attr-defined]
        vm_dir = path.split("/")[1]
        named = self.read_started(path).get("vm")
        return named if isinstance(named, str) and vm_dir in vm_dirs(named) else vm_dir

    def list_sets(self, vm: str | None = None) -> list[SetEntry[M]]:
        """Sets of every VM (or of `vm` only: never another VM's that shares an older directory)."""
        if not self.repo.unlock():  # a wrong or missing key says so, not "no backups"
            return []
        entries = []
        for path in self.set_paths(vm):
            try:
                manifest: M | None = self.parse_manifest(path)
            except (FileNotFoundError, ValueError, BackupSetError, ChecksumMismatch):
                manifest = None
            owner = self.owner(path, manifest)
            if vm is None or owner == vm:
                entries.append(SetEntry(owner, path.rsplit("/", 1)[1], manifest, path))
        return sorted(entries, key=lambda e: (e.vm, e.backup_id))

    def newest_key(self, manifest: M) -> tuple:
        """How `latest` orders complete sets (newest last)."""
        return (manifest.completed_at, manifest.backup_id)  # type: ignore[attr-defined]

    def latest(self, vm: str, at: dt.datetime | None = None, exclude: str | None = None) -> M | None:
        """The newest complete set of `vm` (completed at or before `at`; never `exclude`), None if none."""
        complete = [
            e.manifest
            for e in self.list_sets(vm)
            if e.manifest is not None
            and e.backup_id != exclude
            and (at is None or e.manifest.completed_at <= at)  # type: ignore[attr-defined]
        ]
        return max(complete, key=self.newest_key) if complete else None

    # ---- chunk references (prune's mark phase)
    @abc.abstractmethod
    def refs(self, manifest: M) -> set[str]:
        """Every chunk a complete set references."""

    @abc.abstractmethod
    def raw_refs(self, body: dict) -> set[str]:
        """Chunk references of a manifest this hotvm cannot validate (KeyError/TypeError if not even that)."""

    @abc.abstractmethod
    def journal_refs(self, path: str) -> set[str]:
        """Chunks of what an unfinished set has journaled (a torn journal: that part is done again)."""

